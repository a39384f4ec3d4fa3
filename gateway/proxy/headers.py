"""Upstream MCP servers: one pooled client session per server, header hygiene both ways."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import BadRequest

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the gateway recomputes or must not pass on. Every
# header a message's own ``Connection`` header names is hop-by-hop too (``connection_options``).
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
# Who the client is and which URL it asked for, as a client may claim it: upstreams (and the
# frameworks they run on) believe these, so only the gateway's own X-Forwarded-* describe the caller.
CLIENT_CLAIMS = frozenset(
    h.lower()
    for h in (
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "Forwarded",
        "X-Real-IP",
        "True-Client-IP",
        "X-Client-IP",
        "X-Cluster-Client-IP",
        "CF-Connecting-IP",
        "Fastly-Client-IP",
        "X-Original-URL",
        "X-Rewrite-URL",
    )
)
_NOT_UPSTREAM = (
    HOP_BY_HOP
    | CLIENT_CLAIMS
    | {
        "host",
        "content-length",
        # aiohttp decoded a gzip/deflate/br/zstd body as it arrived: the body the gateway priced and
        # forwards is the decoded one, so the coding it arrived in is not passed on.
        "content-encoding",
        "authorization",  # the caller's AgentPay credential never reaches the upstream
        "x-api-key",
        "accept-encoding",  # we read and relay bodies uncompressed
    }
)
_NOT_DOWNSTREAM = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


@dataclass(frozen=True, slots=True)
class ForwardedFor:
    client_ip: str | None
    proto: str
    host: str | None
    prior_chain: str | None  # an incoming X-Forwarded-For, kept only from trusted proxies


def connection_options(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The header names (lower-cased) that a message's ``Connection`` headers list: RFC 9110 §7.6.1
    makes them hop-by-hop, so a proxy removes them before forwarding the message."""
    return frozenset(
        option.strip().lower()
        for name, value in headers
        if name.lower() == "connection"
        for option in value.split(",")
        if option.strip()
    )


def upstream_headers(
    incoming: Mapping[str, str] | CIMultiDictProxy[str],
    *,
    forwarded: ForwardedFor,
    extra: Mapping[str, str],
) -> CIMultiDict[str]:
    """The headers forwarded to the upstream. A header that cannot be forwarded as it came (a value
    with bytes that are not UTF-8, which aiohttp keeps as surrogate escapes) is a ``BadRequest``."""
    pairs = list(incoming.items())
    dropped = _NOT_UPSTREAM | connection_options(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() not in dropped:
            _check_forwardable(name, value)
            out.add(name, value)
    chain = [c for c in (forwarded.prior_chain, forwarded.client_ip) if c]
    if chain:
        _check_forwardable("X-Forwarded-For", chain[0])
        out["X-Forwarded-For"] = ", ".join(chain)
    _check_forwardable("X-Forwarded-Proto", forwarded.proto)
    out["X-Forwarded-Proto"] = forwarded.proto
    if forwarded.host:
        _check_forwardable("Host", forwarded.host)  # passed on as X-Forwarded-Host
        out["X-Forwarded-Host"] = forwarded.host
    for name, value in extra.items():
        out[name] = value
    return out


def downstream_headers(upstream: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's response headers that are relayed to the client."""
    pairs = list(upstream)
    dropped = _NOT_DOWNSTREAM | connection_options(pairs)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() not in dropped:
            out.add(name, value)
    return out


def _check_forwardable(name: str, value: str) -> None:
    if value.isascii() and name.isascii():
        return
    try:
        name.encode("utf-8")
        value.encode("utf-8")
    except UnicodeEncodeError:  # a surrogate escape: a byte that was not UTF-8
        shown = f"The {name} header" if name.isascii() and name.isprintable() else "A header"
        raise BadRequest(
            f"{shown} has bytes that are not UTF-8", hint="Send header values as ASCII (or UTF-8) text"
        ) from None
