"""MCP session state: the binding of a session to the key that opened it (signed, so it holds across
replicas), and per-process state: calls waiting for a response on a resumed stream, held
task-augmented calls, and legacy HTTP+SSE channels.

Sessions are not authentication: every request is authenticated, and a session opened with one
key is unknown to every other key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.jsonrpc import RequestId

_MAX_SESSIONS = 100_000


@dataclass(slots=True, eq=False)
class Call:
    """One held, priced request."""

    call_id: str
    rpc_id: RequestId
    server: str
    kind: str
    name: str
    price: int
    available_after: int
    settled: bool = False
    parked_at: float | None = None  # set while waiting for a response on another stream / a task


@dataclass(slots=True, eq=False)
class LegacyChannel:
    """A 2024-11-05 HTTP+SSE connection: POSTs are answered on the GET stream."""

    key_id: str
    server: str
    upstream_url: str  # where the client's POSTs go upstream
    events: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)  # events the gateway injects
    pending: dict[RequestId, Call] = field(default_factory=dict)


class SessionSigner:
    """Binds an upstream ``Mcp-Session-Id`` to the key that opened it, statelessly: the client sees
    ``<upstream id>.<mac>``, where the MAC covers the key id. Every replica sharing the secret can
    check it; a session presented with another key fails the check and is answered as unknown."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _mac(self, upstream_sid: str, key_id: str) -> str:
        digest = hmac.new(self._secret, f"{key_id}\0{upstream_sid}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest[:18]).decode()

    def wrap(self, upstream_sid: str, key_id: str) -> str:
        return f"{upstream_sid}.{self._mac(upstream_sid, key_id)}"

    def unwrap(self, client_sid: str, key_id: str) -> str | None:
        upstream_sid, dot, mac = client_sid.rpartition(".")
        if not dot or not upstream_sid:
            return None
        return upstream_sid if hmac.compare_digest(mac, self._mac(upstream_sid, key_id)) else None


class Sessions:
    def __init__(self, *, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._pending: dict[str, dict[RequestId, Call]] = {}
        self._tasks: dict[tuple[str, str], Call] = {}
        self.legacy: dict[str, LegacyChannel] = {}

    def pending(self, session_id: str | None) -> dict[RequestId, Call]:
        """The calls of a session waiting for their response (a live view, possibly empty)."""
        if not session_id:
            return {}
        return self._pending.get(session_id, {})

    def park(self, session_id: str, call: Call) -> None:
        """Keep a call's hold until its response arrives on a resumed stream of this session."""
        if len(self._pending) >= _MAX_SESSIONS and session_id not in self._pending:
            return  # refuse to grow without bound: the call is voided by its owner instead
        call.parked_at = self._clock()
        self._pending.setdefault(session_id, {})[call.rpc_id] = call

    def unpark(self, session_id: str | None, call: Call) -> None:
        calls = self._pending.get(session_id) if session_id else None
        if calls is not None and calls.get(call.rpc_id) is call:
            del calls[call.rpc_id]
            if not calls:
                del self._pending[session_id]  # type: ignore[arg-type]

    def drop(self, session_id: str) -> list[Call]:
        """Forget a session (DELETE); returns its parked calls, to be voided."""
        return list(self._pending.pop(session_id, {}).values())

    def park_task(self, key_id: str, task_id: str, call: Call) -> None:
        call.parked_at = self._clock()
        self._tasks[(key_id, task_id)] = call

    def take_task(self, key_id: str, task_id: Any) -> Call | None:
        if not isinstance(task_id, str):
            return None
        return self._tasks.pop((key_id, task_id), None)

    def expired(self) -> list[Call]:
        """Parked calls older than the window: their responses are not coming; void them."""
        limit = self._clock() - self.window_s
        out: list[Call] = []
        for sid, calls in list(self._pending.items()):
            for rid, call in list(calls.items()):
                if call.parked_at is not None and call.parked_at < limit:
                    out.append(calls.pop(rid))
            if not calls:
                del self._pending[sid]
        for task_key, call in list(self._tasks.items()):
            if call.parked_at is not None and call.parked_at < limit:
                out.append(self._tasks.pop(task_key))
        return out
