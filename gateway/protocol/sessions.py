"""MCP session state: the binding of a session to the key that opened it (signed, so it holds across
replicas), and per-process state: calls waiting for a response on a later stream of their session,
tasks and the keys that created them, and legacy HTTP+SSE channels.

Sessions are not authentication: every request is authenticated, and a session opened with one
key is unknown to every other key. Calls and tasks are keyed by the upstream id the gateway gave
their request (``gateway.protocol.upstream_ids``), never by an id a client chose.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.protocol.jsonrpc import RequestId

_MAX_SESSIONS = 100_000
_MAX_PARKED_PER_SESSION = 1_000
_MAX_TASKS = 100_000
_MAX_TASKS_PER_KEY = 10_000
_MAX_CHANNEL_REQUESTS = 10_000
MAX_CHANNEL_EVENTS = 1_000  # refusals waiting for a legacy client that does not read its stream


@dataclass(slots=True, eq=False)
class Call:
    """One held, priced request."""

    call_id: str
    rpc_id: RequestId  # the client's id
    server: str
    kind: str
    name: str
    price: int
    available_after: int
    upstream_id: str = ""  # the id the gateway sent upstream
    settled: bool = False
    captured: bool = False
    parked_at: float | None = None  # set while waiting for a response on another stream / a task
    delivering: bool = False  # its success is being written to a client: captured once written
    void_if_undelivered: bool = False  # dropped or expired while delivering: voided if the write fails
    metered_price: int | None = None  # metered: charged for a success carrying no valid report
    charge: int | None = None  # what its success costs, when not ``price`` (a metered report)
    reported: int | None = None  # metered: the upstream's report, when it was above the hold and capped
    free: bool = False  # a free allowance's call: nothing held, its success costs 0

    @property
    def amount(self) -> int:
        """What its success costs (captured): the price held, or less for a metered report."""
        return self.price if self.charge is None else self.charge

    def claim_for_delivery(self) -> None:
        """Mark the call as being delivered (its success is about to be written). Nothing else may
        void it then: only the writer captures it, or gives it back with ``delivery_failed``."""
        self.delivering = True

    def delivery_failed(self) -> bool:
        """The write failed: the call is held again. True when it must now be voided (it was dropped
        or its window ended while it was being delivered)."""
        self.delivering = False
        return self.void_if_undelivered and not self.settled

    def finish(self, *, capture: bool) -> bool:
        """Mark the call captured or voided. False when it was already settled (nothing to do)."""
        if self.settled:
            return False
        self.settled = True
        self.captured = capture
        return True


@dataclass(slots=True, eq=False)
class Forwarded:
    """One request the gateway forwarded and whose response it must look at."""

    client_id: RequestId
    method: str
    call: Call | None = None  # the held call, for a priced request
    task_id: str | None = None  # the task a tasks/* request names


@dataclass(slots=True, eq=False)
class Task:
    """A task created through the gateway: the key that created it, and its held call if priced."""

    key_id: str
    call: Call | None


@dataclass(slots=True, eq=False)
class LegacyChannel:
    """A 2024-11-05 HTTP+SSE connection: POSTs are answered on the GET stream."""

    key_id: str
    server: str
    upstream_url: str  # where the client's POSTs go upstream
    events: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(MAX_CHANNEL_EVENTS))
    pending: dict[str, Forwarded] = field(default_factory=dict)  # upstream id -> request awaiting its answer
    closed: bool = False  # its GET stream ended: nothing more is expected on it

    def expect(self, upstream_id: str, forwarded: Forwarded) -> bool:
        """Track a request answered on the GET stream; False when the channel is closed or tracks
        too many (the caller voids the request's call)."""
        if self.closed or len(self.pending) >= _MAX_CHANNEL_REQUESTS:
            return False
        self.pending[upstream_id] = forwarded
        return True


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
        self._pending: dict[str, dict[str, Forwarded]] = {}  # session -> upstream id -> parked request
        self._tasks: OrderedDict[str, Task] = OrderedDict()  # upstream task id -> its creator
        self._tasks_of_key: dict[str, OrderedDict[str, None]] = {}  # key id -> its task ids, oldest first
        self._held_tasks: dict[str, Call] = {}  # task id -> its call while held
        self._inflight: dict[tuple[str, RequestId], str] = {}  # (scope, client id) -> upstream id
        self.legacy: dict[str, LegacyChannel] = {}

    def pending(self, session_id: str | None) -> dict[str, Forwarded]:
        """The calls of a session waiting for their response (a live view, possibly empty)."""
        if not session_id:
            return {}
        return self._pending.get(session_id, {})

    def park(self, session_id: str, forwarded: Forwarded) -> bool:
        """Keep a call's hold until its response arrives on a later stream of this session.
        False when the table is full (the caller voids the call instead)."""
        call = forwarded.call
        if call is None:
            return False
        parked = self._pending.get(session_id)
        if parked is None and len(self._pending) >= _MAX_SESSIONS:
            return False
        if parked is not None and len(parked) >= _MAX_PARKED_PER_SESSION:
            return False
        call.parked_at = self._clock()
        self._pending.setdefault(session_id, {})[call.upstream_id] = forwarded
        return True

    def unpark(self, session_id: str | None, call: Call) -> None:
        calls = self._pending.get(session_id) if session_id else None
        if calls is not None and call.upstream_id in calls and calls[call.upstream_id].call is call:
            del calls[call.upstream_id]
            if not calls:
                del self._pending[session_id]  # type: ignore[arg-type]

    def drop(self, session_id: str) -> list[Call]:
        """Forget a session (DELETE); returns its parked calls, to be voided (a call being delivered
        right now is left to its writer, which voids it if the write fails)."""
        return _releasable(f.call for f in self._pending.pop(session_id, {}).values() if f.call is not None)

    # --- tasks ----------------------------------------------------------------------------

    def bind_task(self, key_id: str, task_id: str, call: Call | None) -> bool:
        """Remember that ``key_id`` created ``task_id``; a priced task keeps its call held. False when
        the task id is already bound (the first creator keeps it: an upstream reusing a task id
        cannot hand one key's task to another)."""
        if task_id in self._tasks:
            return False
        # Forget the oldest binding (of this key when it has many, else of all): its task becomes
        # unknown, which fails closed (refused, and a still-held call is voided by ``expired``).
        own = self._tasks_of_key.setdefault(key_id, OrderedDict())
        if len(own) >= _MAX_TASKS_PER_KEY:
            self._forget_task(next(iter(own)))
        elif len(self._tasks) >= _MAX_TASKS:
            self._forget_task(next(iter(self._tasks)))
        now = self._clock()
        self._tasks[task_id] = Task(key_id, call)
        self._tasks_of_key.setdefault(key_id, OrderedDict())[task_id] = None
        if call is not None:
            call.parked_at = now
            self._held_tasks[task_id] = call
        return True

    def _forget_task(self, task_id: str) -> None:
        task = self._tasks.pop(task_id)
        own = self._tasks_of_key.get(task.key_id)
        if own is not None:
            own.pop(task_id, None)
            if not own:
                del self._tasks_of_key[task.key_id]

    def task_of(self, key_id: str, task_id: object) -> Task | None:
        """The task if ``key_id`` created it, else None (unknown, or another key's)."""
        if not isinstance(task_id, str):
            return None
        task = self._tasks.get(task_id)
        return task if task is not None and task.key_id == key_id else None

    def owns_task(self, key_id: str, task_id: object) -> bool:
        return self.task_of(key_id, task_id) is not None

    def task_settled(self, task_id: str) -> None:
        self._held_tasks.pop(task_id, None)

    # --- ids of requests in flight (for notifications/cancelled) ----------------------------

    def track(self, scope: str, client_id: RequestId, upstream_id: str) -> None:
        if len(self._inflight) < _MAX_SESSIONS * 4:
            self._inflight[(scope, client_id)] = upstream_id

    def untrack(self, scope: str, client_id: RequestId, upstream_id: str) -> None:
        if self._inflight.get((scope, client_id)) == upstream_id:
            del self._inflight[(scope, client_id)]

    def upstream_id_of(self, scope: str, client_id: object) -> str | None:
        if not isinstance(client_id, str | int) or isinstance(client_id, bool):
            return None
        return self._inflight.get((scope, client_id))

    def expired(self) -> list[Call]:
        """Held calls parked longer than the window: their responses are not coming; void them."""
        limit = self._clock() - self.window_s
        out: list[Call] = []
        for sid, calls in list(self._pending.items()):
            for uid, forwarded in list(calls.items()):
                call = forwarded.call
                if call is not None and call.parked_at is not None and call.parked_at < limit:
                    del calls[uid]
                    out.append(call)
            if not calls:
                del self._pending[sid]
        for task_id, call in list(self._held_tasks.items()):
            if call.settled or (call.parked_at is not None and call.parked_at < limit):
                del self._held_tasks[task_id]
                if not call.settled:
                    out.append(call)
        return _releasable(out)

    def touch_task(self, task_id: str) -> None:
        """The task's owner asked about it: its held call waits another window from now."""
        call = self._held_tasks.get(task_id)
        if call is not None and not call.settled:
            call.parked_at = self._clock()


def _releasable(calls: Iterable[Call]) -> list[Call]:
    """The calls that may be voided now. One whose success is being written is left to its writer,
    marked to be voided if that write fails."""
    out: list[Call] = []
    for call in calls:
        if call.delivering:
            call.void_if_undelivered = True
        else:
            out.append(call)
    return out
