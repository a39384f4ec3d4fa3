"""A fair share of one server's upstream connections: per API key, at most ``limit`` requests at once.

A key at its share waits its turn in its own first-come-first-served queue, so its excess never
stands in front of another key's request (the connection pool's own queue is shared by every key:
without this, one key firing more calls than ``max_connections`` delays everyone else's). A wait is
bounded; past it the request is refused with ``TooManyRequests`` (429 + ``Retry-After``).

A released slot passes straight to the key's oldest waiter, so a new request cannot overtake the
queue. Only keys with something in flight or waiting are remembered: memory is bounded by the
requests in flight. Per process and per event loop, owned by one ``UpstreamClient``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from gateway.proxy.limits import TooManyRequests

__all__ = ["FairShare", "share_limit"]

# ceil(0.07 * 100) must be 7, not 8: a product a rounding error above a whole number counts as it.
_EPSILON = 1e-9


def share_limit(fraction: float, max_connections: int) -> int:
    """Requests one key may have in flight: ``ceil(fraction * max_connections)``, at least 1."""
    return max(1, math.ceil(fraction * max_connections - _EPSILON))


class _Key:
    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = 0  # slots taken: requests of this key between acquire and release
        self.waiters: deque[asyncio.Future[None]] = deque()


class FairShare:
    """``await acquire(key, limit, timeout_s)`` before a request, ``release(key)`` once it is over."""

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}

    def __len__(self) -> int:
        """Keys remembered: those with a request in flight or waiting."""
        return len(self._keys)

    def in_flight(self, key: str) -> int:
        state = self._keys.get(key)
        return state.held if state is not None else 0

    def waiting(self, key: str) -> int:
        state = self._keys.get(key)
        return len(state.waiters) if state is not None else 0

    def try_acquire(self, key: str, limit: int) -> bool:
        """Take a slot if one is free and nobody of this key waits for one (never waits)."""
        state = self._keys.get(key)
        if state is None:
            if limit < 1:
                return False
            state = self._keys[key] = _Key()
        elif state.held >= limit or state.waiters:
            return False
        state.held += 1
        return True

    async def acquire(self, key: str, limit: int, timeout_s: float, *, total: int = 0) -> None:
        """Take one of the key's ``limit`` slots, waiting up to ``timeout_s`` (0: not at all) behind
        the key's earlier requests. ``total`` (the server's connection limit) is only quoted in the
        refusal. Raises TooManyRequests when no slot came in time."""
        if self.try_acquire(key, limit):
            return
        state = self._keys.get(key)
        if state is None or timeout_s <= 0:  # no slot to wait for (limit < 1), or no waiting wanted
            raise _refusal(self.in_flight(key), limit, total, timeout_s)
        waiter = asyncio.get_running_loop().create_future()
        state.waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            if _granted(waiter):
                return  # the slot came just as the wait ran out: take it
            self._leave(key, state, waiter)
            raise _refusal(state.held, limit, total, timeout_s) from None
        except BaseException:  # cancelled (the client went away, a deadline), or the client closed
            if _granted(waiter):
                self.release(key)  # given the slot just as it gave up: pass it on
            else:
                self._leave(key, state, waiter)
            raise

    def release(self, key: str) -> None:
        """One request of ``key`` is over: its slot goes to the key's oldest waiter, if any."""
        state = self._keys.get(key)
        if state is None:
            return
        while state.waiters:
            waiter = state.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: ``held`` stays as it is
                return
        state.held -= 1
        self._forget_if_idle(key, state)

    def close(self, exc: BaseException) -> None:
        """Fail every waiting request with ``exc`` (the client is closing)."""
        for state in self._keys.values():
            for waiter in state.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)

    def _leave(self, key: str, state: _Key, waiter: asyncio.Future[None]) -> None:
        if waiter in state.waiters:
            state.waiters.remove(waiter)
        self._forget_if_idle(key, state)

    def _forget_if_idle(self, key: str, state: _Key) -> None:
        if state.held <= 0 and not state.waiters and self._keys.get(key) is state:
            del self._keys[key]


def _granted(waiter: asyncio.Future[None]) -> bool:
    return waiter.done() and not waiter.cancelled() and waiter.exception() is None


def _refusal(in_flight: int, limit: int, total: int, timeout_s: float) -> TooManyRequests:
    calls = f"{in_flight} call{'' if in_flight == 1 else 's'}"
    of_total = f" of the server's {total} upstream connections" if total else ""
    waited = f", and none of them finished within {timeout_s:g}s" if timeout_s > 0 else ""
    error = TooManyRequests(
        f"This key already has {calls} in flight to this server, its fair share ({limit}){of_total}{waited}",
        retry_after_s=max(1, math.ceil(timeout_s)),
    )
    error.hint = (
        "Wait for this key's calls to this server to finish before sending more (send fewer at once), "
        "then retry after the time in the Retry-After header"
    )
    error.data.update(in_flight=in_flight, key_share_limit=limit)
    return error
