"""Coarse deadlines behave as ``asyncio.timeout``: never early, at most a slot late, and a cancellation
that is not theirs stays a cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.proxy.deadlines import Deadlines


async def test_a_block_that_overruns_times_out_never_early() -> None:
    deadlines = Deadlines(granularity_s=0.02)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines.timeout(0.1) as deadline:
            await asyncio.sleep(5)
    elapsed = time.monotonic() - started
    assert deadline.expired
    assert 0.099 <= elapsed < 0.1 + 0.02 + 0.2  # a slot late at most, plus a busy machine's slack
    assert deadlines.pending == 0
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_block_that_finishes_in_time_is_untouched() -> None:
    deadlines = Deadlines()
    async with deadlines.timeout(1) as deadline:
        await asyncio.sleep(0.01)
    assert not deadline.expired
    assert deadlines.pending == 0
    await asyncio.sleep(0.05)  # nothing fires afterwards
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_shorter_deadline_after_a_longer_one_fires_on_time() -> None:
    deadlines = Deadlines(granularity_s=0.02)

    async def long_one() -> str:
        async with deadlines.timeout(30):
            await asyncio.sleep(0.3)
        return "done"

    task = asyncio.create_task(long_one())
    await asyncio.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with deadlines.timeout(0.05):
            await asyncio.sleep(5)
    assert time.monotonic() - started < 0.25
    assert await task == "done"
    deadlines.close()


async def test_nested_deadlines_the_inner_one_is_caught_inside() -> None:
    deadlines = Deadlines()
    async with deadlines.timeout(5) as outer:
        with pytest.raises(TimeoutError):
            async with deadlines.timeout(0.05):
                await asyncio.sleep(5)
        await asyncio.sleep(0.01)
    assert not outer.expired


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadlines = Deadlines()
    entered = asyncio.Event()

    async def waiter() -> None:
        async with deadlines.timeout(10):
            entered.set()
            await asyncio.sleep(5)

    task = asyncio.create_task(waiter())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadlines.pending == 0


async def test_expiry_and_an_outside_cancel_together_stay_a_cancellation() -> None:
    deadlines = Deadlines(granularity_s=0.01)

    async def waiter() -> None:
        async with deadlines.timeout(0.02):
            try:
                await asyncio.sleep(5)
            except asyncio.CancelledError:
                asyncio.current_task().cancel()  # type: ignore[union-attr]  # someone else cancels too
                raise

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(waiter())


async def test_many_deadlines_each_fires_once_and_the_timer_stops() -> None:
    deadlines = Deadlines(granularity_s=0.01)
    fired = 0

    async def one(delay: float) -> None:
        nonlocal fired
        try:
            async with deadlines.timeout(delay):
                await asyncio.sleep(5)
        except TimeoutError:
            fired += 1

    await asyncio.gather(*(one(0.01 + i * 0.003) for i in range(40)))
    assert fired == 40
    assert deadlines.pending == 0
    assert deadlines._handle is None  # nothing left to wait for: no timer armed
