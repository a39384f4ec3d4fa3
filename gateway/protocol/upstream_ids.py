"""The request ids the gateway sends upstream. Pure: no I/O.

The gateway owns every id it forwards. A client's request id is replaced by a gateway-unique
string before the request goes upstream, and the client's id is put back into the response. So a
response settles only the call whose request produced it: a client cannot collide with itself
(the same id twice, on one stream or several), with a parked call or with another client, and ids
of any size round-trip exactly (an upstream that parses numbers as doubles sees a string).

An upstream id reads ``ap.<kind><nonce>.<type><client id>``:

- ``kind`` is ``p`` for a priced call (its result must be billed or withheld) and ``f`` otherwise;
- ``nonce`` is 32 hex digits of which 80 bits are random (``gateway.ids``): unguessable, unique;
- ``type`` is ``n`` for an integer client id (decimal) and ``s`` for a string (as it is).

The client's id travels inside the upstream id, so a response arriving on any stream (a resumed
GET, a legacy SSE channel) can be given back its client's id without a lookup table.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.protocol.jsonrpc import RequestId

PREFIX = "ap."
_PRICED = "p"
_FREE = "f"


def mint(nonce: str, client_id: RequestId, *, priced: bool) -> str:
    """The upstream id for a client request (``nonce`` from ``TimeOrderedIds``: no dots)."""
    kind = _PRICED if priced else _FREE
    if isinstance(client_id, int):
        return f"{PREFIX}{kind}{nonce}.n{client_id}"
    return f"{PREFIX}{kind}{nonce}.s{client_id}"


@dataclass(frozen=True, slots=True)
class Decoded:
    client_id: RequestId
    priced: bool


def decode(upstream_id: object) -> Decoded | None:
    """The client id and kind inside an id the gateway minted, else None (not one of ours)."""
    if not isinstance(upstream_id, str) or not upstream_id.startswith(PREFIX):
        return None
    kind = upstream_id[3:4]
    dot = upstream_id.find(".", 4)
    if kind not in (_PRICED, _FREE) or dot < 0:
        return None
    tag, value = upstream_id[dot + 1 : dot + 2], upstream_id[dot + 2 :]
    if tag == "s":
        return Decoded(value, kind == _PRICED)
    if tag == "n" and value.removeprefix("-").isascii() and value.removeprefix("-").isdigit():
        return Decoded(int(value), kind == _PRICED)
    return None
