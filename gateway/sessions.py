"""Per-process MCP session state: which key opened a session, calls waiting for a response on a
resumed stream, held task-augmented calls, and legacy HTTP+SSE channels.

Sessions are not authentication: every request is authenticated, and a session opened with one
key is unknown to every other key.
"""

from __future__ import annotations

import asyncio
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


@dataclass(slots=True)
class Session:
    key_id: str
    server: str
    pending: dict[RequestId, Call] = field(default_factory=dict)


class Sessions:
    def __init__(self, *, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._tasks: dict[tuple[str, str], Call] = {}
        self.legacy: dict[str, LegacyChannel] = {}

    def owner(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        return None if session is None else session.key_id

    def bind(self, session_id: str, key_id: str, server: str) -> None:
        if session_id not in self._sessions:
            if len(self._sessions) >= _MAX_SESSIONS:
                self._evict()
            self._sessions[session_id] = Session(key_id, server)

    def _evict(self) -> None:
        idle = [sid for sid, s in self._sessions.items() if not s.pending]
        for sid in idle[: max(1, len(idle) // 2)]:
            del self._sessions[sid]

    def pending(self, session_id: str | None) -> dict[RequestId, Call]:
        session = self._sessions.get(session_id) if session_id else None
        return session.pending if session is not None else {}

    def park(self, session_id: str, call: Call) -> None:
        """Keep a call's hold until its response arrives on a resumed stream of this session."""
        session = self._sessions.get(session_id)
        if session is not None:
            call.parked_at = self._clock()
            session.pending[call.rpc_id] = call

    def unpark(self, session_id: str | None, call: Call) -> None:
        session = self._sessions.get(session_id) if session_id else None
        if session is not None and session.pending.get(call.rpc_id) is call:
            del session.pending[call.rpc_id]

    def drop(self, session_id: str) -> list[Call]:
        """Forget a session (DELETE); returns its parked calls, to be voided."""
        session = self._sessions.pop(session_id, None)
        return list(session.pending.values()) if session is not None else []

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
        for session in self._sessions.values():
            for rid, call in list(session.pending.items()):
                if call.parked_at is not None and call.parked_at < limit:
                    out.append(session.pending.pop(rid))
        for task_key, call in list(self._tasks.items()):
            if call.parked_at is not None and call.parked_at < limit:
                out.append(self._tasks.pop(task_key))
        return out
