"""Coarse timeouts for the request path: ``asyncio.timeout`` semantics, one loop timer for all.

``asyncio.timeout`` arms and cancels a loop timer on every use; on the proxy's hot path (the
upstream's answer, each chunk of a relayed stream) that is a measurable share of a request's CPU.
Here deadlines are grouped into slots of ``granularity_s``: entering registers the deadline in its
slot's set, leaving removes it, and a single timer, armed for the earliest slot that still holds a
deadline, expires everything due. A deadline never fires early and at most one slot (plus the loop's
own latency) late. Expiry behaves as ``asyncio.timeout``'s: the task is cancelled, and leaving the
block turns that cancellation into ``TimeoutError`` unless someone else also cancelled the task.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from types import TracebackType

# A loop timer may run this much before its time (uvloop rounds to milliseconds; asyncio's loop
# treats timers within its clock resolution as due): such a slot counts as due.
_TIMER_RESOLUTION_S = 0.001


class Deadlines:
    """The deadlines of one event loop (create it on, or before first use from, that loop)."""

    def __init__(self, granularity_s: float = 0.02) -> None:
        self.granularity_s = granularity_s
        self._buckets: dict[int, set[Deadline]] = {}
        self._slots: list[int] = []  # heap of slot numbers; may hold slots whose bucket is gone
        self._handle: asyncio.TimerHandle | None = None
        self._armed_slot = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def timeout(self, delay_s: float) -> Deadline:
        """``async with deadlines.timeout(s):`` as ``async with asyncio.timeout(s):``."""
        return Deadline(self, delay_s)

    def close(self) -> None:
        """Drop every pending deadline's timer (when the loop's work is over)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._buckets.clear()
        self._slots.clear()

    @property
    def pending(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def _add(self, deadline: Deadline, when: float) -> int:
        slot = math.ceil(when / self.granularity_s)  # the slot ends at or after ``when``: never early
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
            heapq.heappush(self._slots, slot)
            if self._handle is None or slot < self._armed_slot:
                self._arm(slot)
        bucket.add(deadline)
        return slot

    def _discard(self, deadline: Deadline, slot: int) -> None:
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.discard(deadline)  # an empty bucket is dropped when the timer next passes it

    def _arm(self, slot: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._armed_slot = slot
        self._handle = self._loop.call_at(slot * self.granularity_s, self._fire)

    def _fire(self) -> None:
        self._handle = None
        assert self._loop is not None
        now = self._loop.time()
        slots, buckets = self._slots, self._buckets
        due: list[Deadline] = []
        horizon = now + _TIMER_RESOLUTION_S
        while slots:
            slot = slots[0]
            bucket = buckets.get(slot)
            is_due = slot * self.granularity_s <= horizon
            if bucket and not is_due:
                break  # the earliest slot that still holds a deadline
            heapq.heappop(slots)  # due, or empty, or a duplicate entry of a slot already handled
            if bucket is not None:
                del buckets[slot]
                if is_due:
                    due.extend(bucket)
        if slots:
            self._arm(slots[0])
        for deadline in due:
            deadline._expire()


class Deadline:
    """One ``async with`` block under a deadline; see ``Deadlines.timeout``."""

    __slots__ = ("_cancelling", "_delay", "_expired", "_owner", "_slot", "_task")

    def __init__(self, owner: Deadlines, delay_s: float) -> None:
        self._owner = owner
        self._delay = delay_s
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._slot = 0
        self._expired = False

    async def __aenter__(self) -> Deadline:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        owner = self._owner
        if owner._loop is None:
            owner._loop = asyncio.get_running_loop()
        self._slot = owner._add(self, owner._loop.time() + self._delay)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._owner._discard(self, self._slot)
        if self._expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc  # the cancellation was ours: a timeout
        return None

    @property
    def expired(self) -> bool:
        return self._expired

    def _expire(self) -> None:
        if self._task is not None and not self._task.done():
            self._expired = True
            self._task.cancel()
