"""Pure request routing: (Host, raw path) → which server, which endpoint, which path-embedded key.

Works on the *raw* (still percent-encoded) path so encoded slashes and dot-segments cannot smuggle
a request to another server.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from gateway.errors import BadRequest, UnknownServer
from gateway.keys import contains_secret, redact_secrets

Endpoint = Literal["mcp", "sse", "messages"]
_ENDPOINTS: frozenset[str] = frozenset({"mcp", "sse", "messages"})
_MAX_DECODINGS = 3  # percent-decodings of a path segment tried when looking for a key in it


@dataclass(frozen=True, slots=True)
class Route:
    server: str
    endpoint: Endpoint
    path_key: str | None  # an API key embedded as /k/<key>/...
    tail: str  # path after the endpoint segment ("" for /mcp), for the SSE messages endpoint


def host_name(host_header: str | None) -> str | None:
    """Lower-cased host without port; None when absent."""
    if not host_header:
        return None
    host = host_header.strip().lower()
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def resolve(
    host_header: str | None,
    raw_path: str,
    *,
    servers: Collection[str],
    hosts: Mapping[str, str],
) -> Route:
    """Map a request to a configured server or raise UnknownServer / BadRequest."""
    lowered = raw_path.lower()
    if "%2f" in lowered or "%5c" in lowered or "\\" in raw_path:
        raise BadRequest("Encoded slashes are not allowed in gateway paths")
    segments = raw_path.split("/")
    # "%2e" cannot span a "/", so looking in the whole path is looking in every segment
    if (
        not raw_path.startswith("/")
        or "%2e" in lowered
        or ("." in raw_path and any(s in (".", "..") for s in segments))
    ):
        raise BadRequest("Dot-segments are not allowed in gateway paths")
    parts = segments[1:]
    path_key: str | None = None
    if len(parts) >= 2 and parts[0] == "k":
        path_key = parts[1] or None
        parts = parts[2:]
    host_server: str | None = None
    if hosts and host_header:
        full = host_header.strip().lower().rstrip(".")
        host = host_name(host_header)
        host_server = (hosts.get(full) if full else None) or (hosts.get(host) if host else None)
    server: str | None
    if host_server is not None:
        if parts and parts[0] == host_server:
            parts = parts[1:]
        server = host_server
    else:
        if not parts or parts[0] not in servers:
            name = redact_segment(parts[0]) if parts else ""
            raise UnknownServer(f"No MCP server named {name!r} is served here" if name else "No server in the path")
        server, parts = parts[0], parts[1:]
    if not parts or parts[0] not in _ENDPOINTS:
        raise UnknownServer(f"Unknown endpoint for server {server!r}", hint=f"Use /{server}/mcp")
    endpoint = parts[0]
    tail = "/".join(parts[1:])
    if endpoint != "messages" and tail:
        raise UnknownServer(f"Unknown endpoint for server {server!r}", hint=f"Use /{server}/mcp")
    return Route(server=server, endpoint=endpoint, path_key=path_key, tail=tail)  # type: ignore[arg-type]


class Router:
    """``resolve`` for one gateway's servers and hosts, remembering the routes it found for paths
    (``/<server>/mcp`` and the like: a handful per server). Only plain routes are remembered, never
    one whose path embeds a key or carries a tail, and at most ``max_routes`` of them."""

    def __init__(self, servers: Collection[str], hosts: Mapping[str, str], *, max_routes: int = 1024) -> None:
        self._servers = servers
        self._hosts = hosts
        self._max = max_routes
        self._routes: dict[tuple[str | None, str], Route] = {}

    def resolve(self, host_header: str | None, raw_path: str) -> Route:
        key = (host_header if self._hosts else None, raw_path)  # without host routing the Host is moot
        route = self._routes.get(key)
        if route is None:
            route = resolve(host_header, raw_path, servers=self._servers, hosts=self._hosts)
            if route.path_key is None and not route.tail:
                if len(self._routes) >= self._max:
                    self._routes.clear()
                self._routes[key] = route
        return route


PORTAL_LINK_PATH = "/portal/link/"


def redact_path(raw_path: str) -> str:
    """The path with any embedded key replaced, safe to log: the segment after a ``k`` segment, and
    any segment holding something shaped like a key (mistyped URLs such as ``//k/<key>/…`` or
    ``/<key>/mcp``), percent-encoded or not (``/ap%5F…/mcp``)."""
    if raw_path.startswith(PORTAL_LINK_PATH):  # the portal's one-time sign-in links carry a secret token
        return PORTAL_LINK_PATH + "<redacted>"
    if "/k/" not in raw_path and "_" not in raw_path and "%" not in raw_path:  # nothing to redact: as it is
        return raw_path
    segments = raw_path.split("/")
    after_k = False
    for i, segment in enumerate(segments):
        if after_k and segment:
            segments[i] = "<redacted>"
        else:
            segments[i] = redact_segment(segment)
        after_k = segment == "k"
    return "/".join(segments)


def redact_segment(segment: str) -> str:
    """One raw path segment, or ``<redacted>`` in place of what holds a key once percent-decoded."""
    if "%" not in segment:
        return redact_secrets(segment)
    decoded = segment
    for _ in range(_MAX_DECODINGS):  # a key encoded twice (``%255F``) is still a key on the wire
        decoded = unquote(decoded)
        if contains_secret(decoded):
            return "<redacted>"
        if "%" not in decoded:
            break
    return segment
