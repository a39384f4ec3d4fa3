"""Per-key limits: concurrent calls and request rate (token bucket). Pure; the clock is injectable."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import GatewayError

_MAX_TRACKED = 200_000


class TooManyRequests(GatewayError):
    code = "rate_limited"
    http_status = 429
    jsonrpc_code = -32029
    default_hint = "Slow down and retry after the time in the Retry-After header"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, data={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class KeyLimits:
    """``acquire(key)`` before a request, ``release(key)`` after; raises TooManyRequests. With both
    limits off (0) nothing is tracked: ``inflight`` is then 0."""

    def __init__(
        self,
        *,
        max_concurrent: int,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.rate = rate_per_s
        self.burst = burst
        self.enabled = max_concurrent > 0 or rate_per_s > 0  # else nothing is counted or refused
        self._clock = clock
        self._inflight: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key_id: str) -> None:
        if not self.enabled:
            return
        now = self._clock()
        if self.rate > 0:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                if len(self._buckets) >= _MAX_TRACKED:
                    self._buckets.clear()
                bucket = self._buckets[key_id] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens < 1.0:
                wait = max(1, math.ceil((1.0 - bucket.tokens) / self.rate))
                raise TooManyRequests(
                    f"This key exceeded {self.rate:g} requests per second (burst {self.burst})", retry_after_s=wait
                )
        current = self._inflight.get(key_id, 0)
        if self.max_concurrent > 0 and current >= self.max_concurrent:
            raise TooManyRequests(
                f"This key already has {current} calls in flight (limit {self.max_concurrent})", retry_after_s=1
            )
        if self.rate > 0:
            self._buckets[key_id].tokens -= 1.0
        self._inflight[key_id] = current + 1

    def release(self, key_id: str) -> None:
        if not self.enabled:
            return
        current = self._inflight.get(key_id, 0) - 1
        if current <= 0:
            self._inflight.pop(key_id, None)
        else:
            self._inflight[key_id] = current

    def inflight(self, key_id: str) -> int:
        return self._inflight.get(key_id, 0)

    @property
    def tracked(self) -> int:
        """Keys whose rate or concurrency is kept now (bounded: ``_MAX_TRACKED`` rate buckets, and a
        key's concurrency entry goes with its last release)."""
        return len(self._buckets) + len(self._inflight)


class FailureThrottle:
    """Failed look-ups per client address (a key or token nobody holds): ``burst`` of them at once,
    then ``per_s`` a second. ``retry_after(address)`` says, without counting, whether the address
    has none left (the caller then refuses without asking the database); ``failed`` counts one.
    Addresses with a full allowance are not kept; at most ``max_tracked`` are (then it starts again)."""

    def __init__(
        self,
        *,
        burst: int,
        per_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = _MAX_TRACKED,
    ) -> None:
        self.burst = burst
        self.per_s = per_s
        self._clock = clock
        self._max_tracked = max_tracked
        self._buckets: dict[str, _Bucket] = {}

    def _refilled(self, address: str) -> _Bucket | None:
        bucket = self._buckets.get(address)
        if bucket is None:
            return None
        now = self._clock()
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.per_s)
        bucket.updated = now
        if bucket.tokens >= self.burst:  # fully refilled: nothing worth keeping
            del self._buckets[address]
            return None
        return bucket

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may fail again, or None when it may now."""
        bucket = self._refilled(address)
        if bucket is None or bucket.tokens >= 1.0:
            return None
        return max(1, math.ceil((1.0 - bucket.tokens) / self.per_s))

    def failed(self, address: str) -> None:
        bucket = self._refilled(address)
        if bucket is None:
            if len(self._buckets) >= self._max_tracked:
                self._buckets.clear()
            bucket = self._buckets[address] = _Bucket(float(self.burst), self._clock())
        bucket.tokens = max(0.0, bucket.tokens - 1.0)

    @property
    def tracked(self) -> int:
        return len(self._buckets)
