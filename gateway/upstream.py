"""Upstream MCP servers: one pooled client session per server, header hygiene both ways."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

# RFC 9110 §7.6.1 hop-by-hop headers, plus what the gateway recomputes or must not pass on.
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
_NOT_UPSTREAM = HOP_BY_HOP | {
    "host",
    "content-length",
    "authorization",  # the caller's AgentPay credential never reaches the upstream
    "x-api-key",
    "accept-encoding",  # we read and relay bodies uncompressed
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
}
_NOT_DOWNSTREAM = HOP_BY_HOP | {"content-length", "content-encoding", "server", "date"}


@dataclass(frozen=True, slots=True)
class ForwardedFor:
    client_ip: str | None
    proto: str
    host: str | None
    prior_chain: str | None  # an incoming X-Forwarded-For, kept only from trusted proxies


def upstream_headers(
    incoming: Mapping[str, str] | CIMultiDictProxy[str],
    *,
    forwarded: ForwardedFor,
    extra: Mapping[str, str],
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        if name.lower() not in _NOT_UPSTREAM:
            out.add(name, value)
    chain = [c for c in (forwarded.prior_chain, forwarded.client_ip) if c]
    if chain:
        out["X-Forwarded-For"] = ", ".join(chain)
    out["X-Forwarded-Proto"] = forwarded.proto
    if forwarded.host:
        out["X-Forwarded-Host"] = forwarded.host
    for name, value in extra.items():
        out[name] = value
    return out


def downstream_headers(upstream: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream:
        if name.lower() not in _NOT_DOWNSTREAM:
            out.add(name, value)
    return out
