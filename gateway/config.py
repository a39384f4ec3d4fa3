"""The gateway configuration file: YAML in, frozen dataclasses out.

Every error names the file and the line of the offending node, unknown keys are rejected (with a
"did you mean" when a key looks like a typo) and nothing is guessed: a value of the wrong type is
an error, not a coercion. The file is composed with PyYAML's node API (``yaml.compose``) so that
each value keeps its ``start_mark`` and its source text.

    listen: "127.0.0.1:8080"
    database: "sqlite:///agentpay.db"      # relative paths are relative to this file
    prices: "prices.yaml"
    servers:
      weather:
        upstream: "http://127.0.0.1:9000/mcp"
        owner: acme                        # developer account credited with earnings
        hosts: ["weather.example.com"]     # Host-header routing
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from yaml.nodes import Node, ScalarNode

from gateway.config_payments import PaymentsConfig, parse_payments
from gateway.config_portal import (
    OAuthConfig,
    PortalConfig,
    SignupPolicy,
    SmtpConfig,
    parse_oauth,
    parse_portal,
    parse_smtp,
)
from gateway.config_stdio import STDIO_KEYS, StdioConfig, parse_stdio
from gateway.config_yaml import (
    FLOAT_TAG,
    HOST_RE,
    INT_TAG,
    STR_TAG,
    Reader,
    compose_yaml,
    describe,
    expand_env,
    is_null,
    join_host_port,
    line_of,
    resolve_path,
)
from gateway.errors import ConfigError

__all__ = [
    "ADMIN_TOKEN_ENV",
    "RESERVED_SERVER_NAMES",
    "SERVER_NAME_RE",
    "GatewayConfig",
    "LogFormat",
    "OAuthConfig",
    "PortalConfig",
    "ServerConfig",
    "SignupPolicy",
    "SmtpConfig",
    "StdioConfig",
    "default_sse_upstream",
    "expand_env",
    "load_config",
    "parse_listen",
]

LogFormat = Literal["auto", "json", "console"]

#: Path segments the gateway itself uses; a server called like one would shadow a route.
RESERVED_SERVER_NAMES: frozenset[str] = frozenset(
    {
        "k", "v1", "metrics", "healthz", "readyz", "sse", "mcp", "messages", "admin",
        ".well-known", "register", "static", "openapi.json", "portal", "oauth", "payments",
    }
)  # fmt: skip
SERVER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: When set (and not empty), overrides ``admin_token`` from the file.
SESSION_SECRET_ENV = "AGENTPAY_SESSION_SECRET"
ADMIN_TOKEN_ENV = "AGENTPAY_ADMIN_TOKEN"

_MIB = 1024 * 1024
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PERCENT_RE = re.compile(r"^(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?\s*%?$")  # ASCII digits only
# Headers the proxy owns: injecting them would break framing or routing.
_FORBIDDEN_UPSTREAM_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "keep-alive", "te", "trailer"}
)


# --------------------------------------------------------------------------------------------
# The dataclasses
# --------------------------------------------------------------------------------------------
def default_sse_upstream(upstream: str) -> str:
    """The ``/sse`` URL beside an upstream URL: the last path segment is replaced by ``sse``.

    >>> default_sse_upstream("http://127.0.0.1:9000/mcp")
    'http://127.0.0.1:9000/sse'
    """
    parts = urlsplit(upstream)
    path = parts.path.rstrip("/")
    head = path.rsplit("/", 1)[0] if "/" in path else ""
    return urlunsplit((parts.scheme, parts.netloc, f"{head}/sse", parts.query, ""))


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """One MCP server behind the gateway."""

    name: str
    owner: str  # developer account credited with earnings
    upstream: str | None = None  # None (and no stdio): the server is only used through the SDK
    stdio: StdioConfig | None = None  # set (instead of upstream): the gateway runs the server's command
    hosts: tuple[str, ...] = ()  # lower-case Host-header names routed to this server
    sse_upstream: str | None = None  # None with an upstream: derived, see default_sse_upstream
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0  # to the upstream's response headers / JSON body; not SSE streams
    max_connections: int = 100
    max_key_share: float = 0.5  # one API key: at most ceil(this * max_connections) upstream requests at once
    upstream_queue_timeout_s: float = 10.0  # a key at its share waits this long for its turn, then 429
    fee_basis_points: int = 0  # platform fee, 250 = 2.5 %
    # may hold secrets: kept out of repr() so a logged config does not leak them
    upstream_headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)

    def __post_init__(self) -> None:
        if self.sse_upstream is None and self.upstream is not None:
            object.__setattr__(self, "sse_upstream", default_sse_upstream(self.upstream))
        object.__setattr__(self, "hosts", tuple(self.hosts))
        if not isinstance(self.upstream_headers, MappingProxyType):
            object.__setattr__(self, "upstream_headers", MappingProxyType(dict(self.upstream_headers)))


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    """The whole gateway configuration, as loaded from one file."""

    path: Path  # absolute path of the configuration file
    listen_host: str  # without brackets for IPv6 ("::1")
    listen_port: int
    database: str  # sqlite:////abs/path.db or a postgresql:// URL
    prices_path: Path
    servers: Mapping[str, ServerConfig]
    max_body_bytes: int = 4 * _MIB
    max_batch_items: int = 100
    hold_lease_s: float = 30.0
    sweep_interval_s: float = 5.0
    drain_grace_s: float = 30.0
    topup_url: str | None = None
    price_in_description: bool = False
    allowed_origins: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    log_format: LogFormat = "auto"
    admin_listen: str | None = "127.0.0.1:8081"
    admin_token: str | None = field(default=None, repr=False)  # a secret: kept out of repr()
    key_cache_s: float = 1.0
    credit_grants: bool = False  # paid calls held and captured in memory against a grant (issue 19)
    credit_grants_flush_ms: int = 10  # with grants: the wait before an idle writer starts a batch of captures
    resume_window_s: float = 300.0  # how long a call whose client dropped a resumable stream stays held
    max_concurrent_per_key: int = 256  # calls in flight per API key (0 = unlimited)
    rate_per_key: float = 200.0  # sustained requests per second per API key (0 = unlimited)
    rate_burst: int = 1000  # requests a key may make at once before the rate applies
    max_header_bytes: int = 16384  # longest request line / single header accepted
    client_body_timeout_s: float = 30.0  # time a client has to send its whole request body
    client_header_timeout_s: float = 10.0  # time a client has to send a request's line and headers
    client_idle_timeout_s: float = 75.0  # an idle kept-alive client connection is closed after this
    stream_idle_timeout_s: float = 3600.0  # a relayed stream with no upstream bytes for this long is closed
    session_secret: str | None = field(default=None, repr=False)  # signs session ids; share across replicas
    tls_cert: Path | None = None  # PEM certificate chain: terminate TLS on `listen` (HTTP/1.1)
    tls_key: Path | None = None  # PEM private key for tls_cert
    oauth: OAuthConfig = field(default_factory=OAuthConfig)
    portal: PortalConfig = field(default_factory=PortalConfig)
    smtp: SmtpConfig | None = None  # None: no e-mail (verification off, resets by `agentpay logins invite`)
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)  # issue 16: Stripe (config_payments)

    def __post_init__(self) -> None:
        if not isinstance(self.servers, MappingProxyType):
            object.__setattr__(self, "servers", MappingProxyType(dict(self.servers)))
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))

    @property
    def listen(self) -> str:
        """``host:port`` as written in the file (IPv6 hosts in brackets)."""
        return join_host_port(self.listen_host, self.listen_port)

    def server_for_host(self, host: str) -> ServerConfig | None:
        """The server a ``Host`` header routes to (case-insensitive; the port is optional)."""
        wanted = host.strip().lower().rstrip(".")
        candidates = [wanted]
        plain_with_port = not wanted.startswith("[") and wanted.count(":") == 1
        if plain_with_port or (wanted.startswith("[") and "]:" in wanted):
            candidates.append(wanted.rsplit(":", 1)[0])
        for candidate in candidates:
            for server in self.servers.values():
                if candidate in server.hosts:
                    return server
        return None


# --------------------------------------------------------------------------------------------
# Small public helpers
# --------------------------------------------------------------------------------------------
def parse_listen(text: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into host and port; ValueError when invalid."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"{text!r} is not [ipv6]:port")
        host, port_text = text[1:close], text[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r} is not host:port")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:8080")
        if not HOST_RE.match(host):
            raise ValueError(f"{host!r} is not a valid host name or address")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)


_TOP_KEYS = (
    "listen", "database", "prices", "servers", "max_body_bytes", "max_batch_items", "hold_lease_s",
    "sweep_interval_s", "drain_grace_s", "topup_url", "price_in_description", "allowed_origins",
    "trusted_proxies", "log_format", "admin_listen", "admin_token", "key_cache_s",
    "resume_window_s", "tls_cert", "tls_key", "max_concurrent_per_key", "rate_per_key", "rate_burst",
    "max_header_bytes", "client_body_timeout_s", "stream_idle_timeout_s", "session_secret",
    "client_header_timeout_s",
    "client_idle_timeout_s", "credit_grants", "credit_grants_flush_ms",
    "oauth",
    "portal", "smtp",
    "payments",
)  # fmt: skip
_SERVER_KEYS = (
    "upstream", "owner", "hosts", "sse_upstream", "connect_timeout_s", "read_timeout_s",
    "max_connections", "max_key_share", "upstream_queue_timeout_s", "platform_fee_percent", "upstream_headers",
    *STDIO_KEYS,
)  # fmt: skip
_LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "json", "console")

_T = TypeVar("_T")


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a gateway configuration file.

    ``env`` replaces ``os.environ`` for ``${VAR}`` expansion and ``AGENTPAY_ADMIN_TOKEN``.
    Raises ConfigError (with file and line) for anything wrong.
    """
    abs_path = Path(os.path.abspath(os.fspath(path)))  # abspath: symlinks are not resolved
    file = str(path)
    try:
        text = abs_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("configuration file not found", file=file) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file is not UTF-8 ({exc.reason})", file=file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file: {exc.strerror or exc}", file=file) from None
    return parse_config(text, path=abs_path, file=file, env=env)


def parse_config(
    text: str, *, path: Path, file: str | None = None, env: Mapping[str, str] | None = None
) -> GatewayConfig:
    """Validate configuration text as if read from ``path`` (relative paths resolve beside it)."""
    environ: Mapping[str, str] = os.environ if env is None else env
    r = Reader(file or str(path), environ)
    root = compose_yaml(text, r.file)
    if root is None:
        raise r.error("the configuration file is empty; see config/gateway.yaml for an example", 1)
    top = r.mapping(root, "the configuration file")
    r.check_keys(top, _TOP_KEYS, "the configuration file")
    base = path.parent

    def opt(key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        if key not in top or is_null(top[key][1]):
            return default
        return parse(top[key][1], key)

    # listen
    listen_host, listen_port = opt("listen", lambda n, w: _listen(r, n, w), ("127.0.0.1", 8080))
    database = _database(r, r.require(top, "database", "", 1), base)
    prices_node = r.require(top, "prices", "", 1)
    prices_path = resolve_path(base, r.string(prices_node, "prices").strip())
    servers = _servers(r, r.require(top, "servers", "", 1) if "servers" not in top else top["servers"][1], base)

    admin_listen: str | None = "127.0.0.1:8081"
    if "admin_listen" in top:
        node = top["admin_listen"][1]
        if is_null(node):
            admin_listen = None
        else:
            host, port = _listen(r, node, "admin_listen")
            admin_listen = join_host_port(host, port)
            if port != 0 and (host, port) == (listen_host, listen_port):
                raise r.error("admin_listen must differ from listen", node)

    admin_token = opt("admin_token", r.env_string, None)
    override = environ.get(ADMIN_TOKEN_ENV)
    if override:
        admin_token = override

    log_format: LogFormat = "auto"
    if "log_format" in top:
        node = top["log_format"][1]
        value = r.string(node, "log_format")
        if value not in _LOG_FORMATS:
            raise r.error(f"log_format must be one of {', '.join(_LOG_FORMATS)}, got {value!r}", node)
        log_format = value

    tls_cert = opt("tls_cert", lambda n, w: resolve_path(base, r.string(n, w)), None)
    tls_key = opt("tls_key", lambda n, w: resolve_path(base, r.string(n, w)), None)
    if (tls_cert is None) != (tls_key is None):
        raise r.error("tls_cert and tls_key must be given together", top[("tls_cert" if tls_cert else "tls_key")][1])

    no_items: list[tuple[str, Node]] = []
    origins: list[str] = []
    for text_value, node in opt("allowed_origins", r.string_list, no_items):
        origins.append(_origin(r, text_value, node))
    proxies: list[str] = []
    for text_value, node in opt("trusted_proxies", r.string_list, no_items):
        try:
            ipaddress.ip_network(text_value.strip(), strict=False)
        except ValueError:
            raise r.error(f"trusted_proxies: {text_value!r} is not an IP address or CIDR network", node) from None
        proxies.append(text_value.strip())

    return GatewayConfig(
        path=path,
        listen_host=listen_host,
        listen_port=listen_port,
        database=database,
        prices_path=prices_path,
        servers=MappingProxyType(servers),
        max_body_bytes=opt("max_body_bytes", lambda n, w: r.integer(n, w, minimum=1), 4 * _MIB),
        max_batch_items=opt("max_batch_items", lambda n, w: r.integer(n, w, minimum=1), 100),
        hold_lease_s=opt("hold_lease_s", lambda n, w: r.number(n, w, positive=True), 30.0),
        sweep_interval_s=opt("sweep_interval_s", lambda n, w: r.number(n, w, positive=True), 5.0),
        drain_grace_s=opt("drain_grace_s", lambda n, w: r.number(n, w, positive=False), 30.0),
        topup_url=opt("topup_url", r.http_url, None),
        price_in_description=opt("price_in_description", r.boolean, False),
        allowed_origins=tuple(origins),
        trusted_proxies=tuple(proxies),
        log_format=log_format,
        admin_listen=admin_listen,
        admin_token=admin_token,
        key_cache_s=opt("key_cache_s", lambda n, w: r.number(n, w, positive=False), 1.0),
        credit_grants=opt("credit_grants", r.boolean, False),
        credit_grants_flush_ms=opt("credit_grants_flush_ms", lambda n, w: _flush_ms(r, n, w), 10),
        resume_window_s=opt("resume_window_s", lambda n, w: r.number(n, w, positive=True), 300.0),
        tls_cert=tls_cert,
        tls_key=tls_key,
        max_concurrent_per_key=opt("max_concurrent_per_key", lambda n, w: r.integer(n, w, minimum=0), 256),
        rate_per_key=opt("rate_per_key", lambda n, w: r.number(n, w, positive=False), 200.0),
        rate_burst=opt("rate_burst", lambda n, w: r.integer(n, w, minimum=1), 1000),
        max_header_bytes=opt("max_header_bytes", lambda n, w: r.integer(n, w, minimum=1024), 16384),
        client_body_timeout_s=opt("client_body_timeout_s", lambda n, w: r.number(n, w, positive=True), 30.0),
        client_header_timeout_s=opt("client_header_timeout_s", lambda n, w: r.number(n, w, positive=True), 10.0),
        client_idle_timeout_s=opt("client_idle_timeout_s", lambda n, w: r.number(n, w, positive=True), 75.0),
        session_secret=environ.get(SESSION_SECRET_ENV) or opt("session_secret", r.env_string, None),
        stream_idle_timeout_s=opt("stream_idle_timeout_s", lambda n, w: r.number(n, w, positive=True), 3600.0),
        oauth=opt("oauth", lambda n, w: parse_oauth(r, n), OAuthConfig()),
        portal=parse_portal(r, top["portal"][1] if "portal" in top else None, listen_host, listen_port, tls_cert),
        smtp=opt("smtp", lambda n, w: parse_smtp(r, n), None),
        payments=opt("payments", lambda n, w: parse_payments(r, n), PaymentsConfig()),
    )


def _listen(r: Reader, node: Node, where: str) -> tuple[str, int]:
    if not isinstance(node, ScalarNode) or node.tag != STR_TAG:
        raise r.error(f'{where} must be "host:port", e.g. "127.0.0.1:8080", got {describe(node)}', node)
    try:
        return parse_listen(node.value)
    except ValueError as exc:
        raise r.error(f'{where}: {exc} (write "host:port", e.g. "127.0.0.1:8080" or "[::1]:8080")', node) from None


def _database(r: Reader, node: Node, base: Path) -> str:
    url = r.env_string(node, "database").strip()
    if url.startswith(("postgresql://", "postgres://")):
        return url
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if not rest.startswith("/") or rest == "/":
            raise r.error(f"database: {url!r} has no path; write sqlite:///relative.db or sqlite:////absolute.db", node)
        location, sep, query = rest[1:].partition("?")
        if location == ":memory:":
            return url
        db_path = resolve_path(base, location)
        return f"sqlite:///{db_path.as_posix()}" + (f"?{query}" if sep else "")
    raise r.error(f"database: {url!r} is not supported; use sqlite:///path.db or postgresql://user:pass@host/db", node)


def _origin(r: Reader, text: str, node: Node) -> str:
    value = text.strip().rstrip("/").lower()
    if value == "null":
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        raise r.error(f"allowed_origins: {text!r} is not an origin like https://app.example.com", node) from None
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise r.error(f"allowed_origins: {text!r} is not an origin like https://app.example.com (no path)", node)
    return value


def _servers(r: Reader, node: Node, base: Path) -> dict[str, ServerConfig]:
    if is_null(node):
        return {}
    entries = r.mapping(node, "servers")
    servers: dict[str, ServerConfig] = {}
    host_owner: dict[str, tuple[str, int]] = {}
    for name, (key_node, value_node) in entries.items():
        if name in RESERVED_SERVER_NAMES:
            raise r.error(
                f"server name {name!r} is reserved (the gateway uses /{name} itself); choose another name",
                key_node,
            )
        if not SERVER_NAME_RE.match(name):
            raise r.error(
                f"server name {name!r} is not allowed: use 1-63 lower-case letters, digits, '-' or '_', "
                "starting with a letter or digit",
                key_node,
            )
        if name in RESERVED_SERVER_NAMES:
            raise r.error(
                f"server name {name!r} is reserved (the gateway uses /{name} itself); choose another name",
                key_node,
            )
        server, host_lines = _server(r, name, key_node, value_node, base)
        for host in server.hosts:
            if host in host_owner:
                other, other_line = host_owner[host]
                raise r.error(
                    f"host {host!r} of servers.{name} is already routed to servers.{other} "
                    f"(line {other_line}); a host can route to one server only",
                    host_lines[host],
                )
            host_owner[host] = (name, host_lines[host])
        servers[name] = server
    return servers


def _server(r: Reader, name: str, key_node: Node, node: Node, base: Path) -> tuple[ServerConfig, dict[str, int]]:
    where = f"servers.{name}"
    entries = r.mapping(node, where)
    r.check_keys(entries, _SERVER_KEYS, where)

    def opt(key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        if key not in entries or is_null(entries[key][1]):
            return default
        return parse(entries[key][1], f"{where}.{key}")

    owner = r.string(r.require(entries, "owner", where, line_of(key_node)), f"{where}.owner").strip()
    upstream = opt("upstream", r.http_url, None)
    sse_upstream = opt("sse_upstream", r.http_url, None)
    stdio = parse_stdio(r, where, entries, base, has_upstream=upstream is not None)
    if sse_upstream is not None and upstream is None:
        raise r.error(f"{where}.sse_upstream needs an upstream as well", entries["sse_upstream"][1])

    hosts: list[str] = []
    host_lines: dict[str, int] = {}
    no_items: list[tuple[str, Node]] = []
    for host_text, host_node in opt("hosts", r.string_list, no_items):
        host = host_text.strip().lower().rstrip(".")
        if not _valid_host(host):
            raise r.error(f"{where}.hosts: {host_text!r} is not a host name such as api.example.com", host_node)
        if host in hosts:
            raise r.error(f"{where}.hosts lists {host!r} twice", host_node)
        hosts.append(host)
        host_lines[host] = line_of(host_node)

    fee = 0
    if "platform_fee_percent" in entries and not is_null(entries["platform_fee_percent"][1]):
        fee = _fee_basis_points(r, entries["platform_fee_percent"][1], f"{where}.platform_fee_percent")

    headers: dict[str, str] = {}
    if "upstream_headers" in entries and not is_null(entries["upstream_headers"][1]):
        header_entries = r.mapping(entries["upstream_headers"][1], f"{where}.upstream_headers")
        for header, (h_key, h_value) in header_entries.items():
            if not _HEADER_NAME_RE.match(header):
                raise r.error(f"{where}.upstream_headers: {header!r} is not a valid header name", h_key)
            if header.lower() in _FORBIDDEN_UPSTREAM_HEADERS:
                raise r.error(f"{where}.upstream_headers: {header!r} is set by the gateway itself", h_key)
            if any(existing.lower() == header.lower() for existing in headers):
                raise r.error(f"{where}.upstream_headers: {header!r} is given twice", h_key)
            if isinstance(h_value, ScalarNode) and h_value.tag in (INT_TAG, FLOAT_TAG):
                value = str(h_value.value)  # X-Api-Version: 2 is meant as text
            else:
                value = r.env_string(h_value, f"{where}.upstream_headers.{header}")
            if "\r" in value or "\n" in value:
                raise r.error(f"{where}.upstream_headers.{header} must be a single line", h_value)
            headers[header] = value

    read_timeout_s = opt("read_timeout_s", lambda n, w: r.number(n, w, positive=True), 300.0)
    # The wait for a turn is part of the wait for the answer: past read_timeout_s it would be a 504.
    queue_timeout_s = opt("upstream_queue_timeout_s", lambda n, w: r.number(n, w, positive=False), None)
    if queue_timeout_s is None:
        queue_timeout_s = min(10.0, read_timeout_s)
    elif queue_timeout_s > read_timeout_s:
        raise r.error(
            f"{where}.upstream_queue_timeout_s ({queue_timeout_s:g}) must not exceed {where}.read_timeout_s "
            f"({read_timeout_s:g}), which bounds the wait for an answer, this wait included",
            entries["upstream_queue_timeout_s"][1],
        )

    server = ServerConfig(
        name=name,
        owner=owner,
        upstream=upstream,
        stdio=stdio,
        hosts=tuple(hosts),
        sse_upstream=sse_upstream,
        connect_timeout_s=opt("connect_timeout_s", lambda n, w: r.number(n, w, positive=True), 5.0),
        read_timeout_s=read_timeout_s,
        max_connections=opt("max_connections", lambda n, w: r.integer(n, w, minimum=1), 100),
        max_key_share=opt("max_key_share", r.fraction, 0.5),
        upstream_queue_timeout_s=queue_timeout_s,
        fee_basis_points=fee,
        upstream_headers=MappingProxyType(headers),
    )
    return server, host_lines


def _flush_ms(r: Reader, node: Node, where: str) -> int:
    """With credit grants, how long a captured call waits before an idle writer starts a batch: 1 to
    1,000 ms (what a crash may leave unbilled at low load grows with it)."""
    value = r.integer(node, where, minimum=1)
    if value > 1000:
        raise r.error(f"{where} must be at most 1000 (one second), got {value}", node)
    return value


def _valid_host(host: str) -> bool:
    """A host name or address, optionally with a port ("api.example.com", "[::1]:8080")."""
    if host.startswith("["):
        close = host.find("]")
        if close < 0:
            return False
        try:
            ipaddress.IPv6Address(host[1:close])
        except ValueError:
            return False
        rest = host[close + 1 :]
        port = rest[1:]
        return rest == "" or (rest.startswith(":") and port.isascii() and port.isdigit() and int(port) <= 65535)
    name, sep, port = host.partition(":")
    if sep and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        return False
    return bool(HOST_RE.match(name)) and len(name) <= 253


def _fee_basis_points(r: Reader, node: Node, where: str) -> int:
    """Percent text ("2.5") to basis points (250), exactly: no float ever sees the value."""
    if not isinstance(node, ScalarNode) or node.tag not in (INT_TAG, FLOAT_TAG, STR_TAG):
        raise r.error(f"{where} must be a percentage such as 2.5, got {describe(node)}", node)
    match = _PERCENT_RE.match(str(node.value).strip())
    if match is None:
        raise r.error(f"{where} must be a percentage such as 2.5, got {node.value!r}", node)
    frac = (match.group("frac") or "").rstrip("0")
    if len(frac) > 2:
        raise r.error(f"{where} has more than 2 decimal places (the unit is 0.01 %), got {node.value!r}", node)
    basis_points = int(match.group("int")) * 100 + int(frac.ljust(2, "0"))
    if basis_points > 10_000:
        raise r.error(f"{where} must be between 0 and 100, got {node.value!r}", node)
    return basis_points
