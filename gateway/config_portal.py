"""The web-facing sections of the gateway configuration: ``portal:`` (sign-up policy, public URL,
sessions), ``smtp:`` (the portal's mail) and ``oauth:`` (the gateway as an OAuth 2.1 authorization
server). Parsed with the same ``Reader`` as the rest of ``gateway.config`` (every error with its line).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from yaml.nodes import Node

from gateway.config_yaml import HOST_RE, Reader, is_ip, is_null, join_host_port, line_of

SignupPolicy = Literal["open", "invite", "closed"]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthConfig:
    """``oauth:``: the gateway as the OAuth 2.1 authorization server of its MCP servers (issue 17)."""

    enabled: bool = False
    issuer: str | None = None  # an origin ("https://pay.example.com"); None: portal.base_url's origin
    access_token_ttl_s: int = 3600
    refresh_token_ttl_s: int = 2592000
    client_metadata_hosts_allowed: tuple[str, ...] = ()  # CIMD fetches allowed to these hosts even if private


@dataclass(frozen=True, slots=True, kw_only=True)
class PortalConfig:
    """``portal:``: the web portal's sign-up policy, its public URL and its sessions (issue 15)."""

    signup: SignupPolicy = "invite"  # the code's default; config/gateway.yaml says open
    base_url: str | None = None  # links in mail and redirects; None: http(s)://<listen> (filled in by load_config)
    session_ttl_s: float = 604800.0  # sliding: a session lives this long after its last use (at most 30 days)


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpConfig:
    """``smtp:``: where the portal's mail (verification, password reset) is sent from."""

    host: str
    port: int = 587
    starttls: bool = True
    from_addr: str  # the ``from`` key: "AgentPay <billing@example.com>"
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # a secret: kept out of repr()


_OAUTH_KEYS = ("enabled", "issuer", "access_token_ttl_s", "refresh_token_ttl_s", "client_metadata_hosts_allowed")


_PORTAL_KEYS = ("signup", "base_url", "session_ttl_s")
_SIGNUP_POLICIES: tuple[SignupPolicy, ...] = ("open", "invite", "closed")
_SMTP_KEYS = ("host", "port", "starttls", "from", "username", "password")
MAX_SESSION_S = 30 * 24 * 3600.0  # a portal session ends this long after sign-in, however often it is used


def parse_portal(
    r: Reader, node: Node | None, listen_host: str, listen_port: int, tls_cert: Path | None
) -> PortalConfig:
    scheme = "https" if tls_cert is not None else "http"
    default_url = f"{scheme}://{join_host_port(listen_host, listen_port)}"
    if node is None or is_null(node):
        return PortalConfig(base_url=default_url)
    entries = r.mapping(node, "portal")
    r.check_keys(entries, _PORTAL_KEYS, "portal")

    def opt(key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        if key not in entries or is_null(entries[key][1]):
            return default
        return parse(entries[key][1], f"portal.{key}")

    signup: SignupPolicy = "invite"
    if "signup" in entries and not is_null(entries["signup"][1]):
        value = r.string(entries["signup"][1], "portal.signup")
        if value not in _SIGNUP_POLICIES:
            raise r.error(
                f"portal.signup must be one of {', '.join(_SIGNUP_POLICIES)}, got {value!r}", entries["signup"][1]
            )
        signup = value
    base_url = opt("base_url", r.http_url, default_url)
    parts = urlsplit(base_url)
    if parts.query:
        raise r.error(f"portal.base_url: {base_url!r} must not have a ?query", entries["base_url"][1])
    ttl = opt("session_ttl_s", lambda n, w: r.number(n, w, positive=True), 604800.0)
    if ttl > MAX_SESSION_S:
        raise r.error(
            f"portal.session_ttl_s must be at most {int(MAX_SESSION_S)} (30 days, the longest a session lives), "
            f"got {entries['session_ttl_s'][1].value}",
            entries["session_ttl_s"][1],
        )
    return PortalConfig(signup=signup, base_url=base_url.rstrip("/"), session_ttl_s=ttl)


def parse_smtp(r: Reader, node: Node) -> SmtpConfig:
    entries = r.mapping(node, "smtp")
    r.check_keys(entries, _SMTP_KEYS, "smtp")
    line = line_of(node)

    def opt(key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        if key not in entries or is_null(entries[key][1]):
            return default
        return parse(entries[key][1], f"smtp.{key}")

    host_node = r.require(entries, "host", "smtp", line)
    host = r.string(host_node, "smtp.host").strip()
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if not (HOST_RE.match(host) and len(host) <= 253):
            raise r.error(
                f"smtp.host: {host!r} is not a host name such as smtp.example.com (the port goes in smtp.port)",
                host_node,
            ) from None
    port = opt("port", lambda n, w: r.integer(n, w, minimum=1), 587)
    if port > 65535:
        raise r.error(f"smtp.port must be a number from 1 to 65535, got {port}", entries["port"][1])
    from_node = r.require(entries, "from", "smtp", line)
    from_addr = r.env_string(from_node, "smtp.from").strip()
    _, address = parseaddr(from_addr)
    if address.count("@") != 1 or any(c.isspace() for c in address) or any(ord(c) < 32 for c in from_addr):
        raise r.error(f'smtp.from: {from_addr!r} is not an address such as "AgentPay <billing@example.com>"', from_node)
    username = opt("username", r.env_string, None)
    password = opt("password", r.env_string, None)
    if (username is None) != (password is None):
        missing = "password" if password is None else "username"
        raise r.error(f"smtp.username and smtp.password must be given together (smtp.{missing} is missing)", line)
    starttls = opt("starttls", r.boolean, True)
    if username is not None and not starttls and host.lower() not in ("localhost", "127.0.0.1", "::1", "[::1]"):
        raise r.error(
            "smtp.username and smtp.password would cross the network unencrypted with smtp.starttls: false; "
            "set starttls: true (or relay through a mail server on this machine)",
            entries["starttls"][1],
        )
    return SmtpConfig(
        host=host,
        port=port,
        starttls=starttls,
        from_addr=from_addr,
        username=username,
        password=password,
    )


def parse_oauth(r: Reader, node: Node) -> OAuthConfig:
    entries = r.mapping(node, "oauth")
    r.check_keys(entries, _OAUTH_KEYS, "oauth")

    def opt(key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        if key not in entries or is_null(entries[key][1]):
            return default
        return parse(entries[key][1], f"oauth.{key}")

    issuer = opt("issuer", r.http_url, None)
    if issuer is not None:
        parts = urlsplit(issuer)
        if parts.path not in ("", "/") or parts.query:
            raise r.error(
                f"oauth.issuer: {issuer!r} must be an origin such as https://pay.example.com (no path, no query)",
                entries["issuer"][1],
            )
        issuer = f"{parts.scheme}://{parts.netloc}".lower()
    hosts: list[str] = []
    no_items: list[tuple[str, Node]] = []
    for host_text, host_node in opt("client_metadata_hosts_allowed", r.string_list, no_items):
        host = host_text.strip().lower().strip("[]")
        if not (is_ip(host) or (HOST_RE.match(host) and len(host) <= 253)):
            raise r.error(
                f"oauth.client_metadata_hosts_allowed: {host_text!r} is not a host name or IP address", host_node
            )
        hosts.append(host)
    return OAuthConfig(
        enabled=opt("enabled", r.boolean, False),
        issuer=issuer,
        access_token_ttl_s=opt("access_token_ttl_s", lambda n, w: r.integer(n, w, minimum=60), 3600),
        refresh_token_ttl_s=opt("refresh_token_ttl_s", lambda n, w: r.integer(n, w, minimum=60), 2592000),
        client_metadata_hosts_allowed=tuple(hosts),
    )
