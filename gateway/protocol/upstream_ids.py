"""The request ids the gateway sends upstream. Pure: no I/O.

The gateway owns every id it forwards. A client's request id is replaced by a gateway-unique
string before the request goes upstream, and the client's id is put back into the response. So a
response settles only the call whose request produced it: a client cannot collide with itself
(the same id twice, on one stream or several), with a parked call or with another client, and ids
of any size round-trip exactly (an upstream that parses numbers as doubles sees a string).

An upstream id reads ``ap.<kind><nonce>-<owner>.<type><client id>``:

- ``kind`` is ``p`` for a priced call (its result must be billed or withheld) and ``f`` otherwise;
- ``nonce`` is 32 hex digits of which 80 bits are random (``gateway.ids``): unguessable, unique;
- ``owner`` names the API key that sent the request (``owner_tag``): a response that reaches another
  key's stream (an upstream whose event store replays any session's events for any event id) is
  recognised and not delivered there;
- ``type`` is ``n`` for an integer client id (decimal) and ``s`` for a string (as it is).

The client's id travels inside the upstream id, so a response arriving on any stream (a resumed
GET, a legacy SSE channel) can be given back its client's id without a lookup table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from gateway.protocol.jsonrpc import RequestId

PREFIX = "ap."
_PRICED = "p"
_FREE = "f"


def owner_tag(key_id: str) -> str:
    """A short tag of the key that sent a request (not a secret: key ids are internal row ids)."""
    return hashlib.sha256(key_id.encode("utf-8", "backslashreplace")).hexdigest()[:10]


def mint(nonce: str, client_id: RequestId, *, priced: bool, owner: str) -> str:
    """The upstream id for a client request (``nonce`` from ``TimeOrderedIds`` and ``owner`` from
    ``owner_tag``: neither has a dot)."""
    kind = _PRICED if priced else _FREE
    if isinstance(client_id, int):
        return f"{PREFIX}{kind}{nonce}-{owner}.n{client_id}"
    return f"{PREFIX}{kind}{nonce}-{owner}.s{client_id}"


@dataclass(frozen=True, slots=True)
class Decoded:
    client_id: RequestId
    priced: bool
    owner: str


def decode(upstream_id: object) -> Decoded | None:
    """The client id and kind inside an id the gateway minted, else None (not one of ours)."""
    if not isinstance(upstream_id, str) or not upstream_id.startswith(PREFIX):
        return None
    kind = upstream_id[3:4]
    dot = upstream_id.find(".", 4)
    dash = upstream_id.rfind("-", 4, dot)
    if kind not in (_PRICED, _FREE) or dot < 0 or dash < 0:
        return None
    owner, priced = upstream_id[dash + 1 : dot], kind == _PRICED
    tag, value = upstream_id[dot + 1 : dot + 2], upstream_id[dot + 2 :]
    if tag == "s":
        return Decoded(value, priced, owner)
    if tag == "n" and value.removeprefix("-").isascii() and value.removeprefix("-").isdigit():
        return Decoded(int(value), priced, owner)
    return None
