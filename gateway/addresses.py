"""Who is calling, when the gateway sits behind proxies: the peer, or the last ``X-Forwarded-For`` hop
when the peer is one of the configured ``trusted_proxies``. One rule for every throttle by address
(failed key look-ups, OAuth registrations, sign-ins) and for the forwarding headers. No I/O."""

from __future__ import annotations

import ipaddress


def trusted(peer: str | None, proxies: tuple[str, ...]) -> bool:
    """Whether ``peer`` is inside one of ``proxies`` (addresses or networks; a bad entry matches nothing)."""
    if peer is None or not proxies:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for entry in proxies:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def client_address(peer: str | None, forwarded_for: str | None, proxies: tuple[str, ...]) -> str:
    """The caller's address for throttling: the last ``X-Forwarded-For`` hop when ``peer`` is a
    trusted proxy (the hop that proxy saw), else the peer itself."""
    fallback = peer or "unknown"
    if forwarded_for and trusted(peer, proxies):
        return forwarded_for.split(",")[-1].strip() or fallback
    return fallback
