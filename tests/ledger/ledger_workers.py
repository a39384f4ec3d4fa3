"""Code run in separate OS processes by the cross-process tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
import sqlite3
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from threading import BrokenBarrierError

from gateway.errors import GatewayError
from gateway.ledger.base import FreeCall, HoldRequest

from .conftest import StoreSpec


async def _hold_and_capture(store: StoreSpec, worker: int, calls: int, price: int, barrier: Barrier) -> int:
    async with store.open() as ledger:
        barrier.wait(timeout=60)  # start all processes' traffic together

        async def one(i: int) -> int:
            call_id = f"p{worker}-{i}"
            outcome = await ledger.hold(
                HoldRequest(
                    call_id=call_id,
                    key_id=None,
                    user="alice",
                    developer="acme",
                    server="weather",
                    method="tools/call",
                    name="forecast",
                    amount=price,
                    fee=1,
                    lease_s=60,
                    owner=f"worker-{worker}",
                )
            )
            if not outcome.ok:
                return 0
            return (await ledger.capture(call_id)).amount

        return sum(await asyncio.gather(*(one(i) for i in range(calls))))


def hold_and_capture(
    store: StoreSpec, worker: int, calls: int, price: int, barrier: Barrier, results: Queue[int]
) -> None:
    """Process entry point: attempt ``calls`` holds+captures at ``price``; report the total captured."""
    results.put(asyncio.run(_hold_and_capture(store, worker, calls, price, barrier)))


async def _open_and_verify(stores: list[StoreSpec], barrier: Barrier) -> list[str]:
    problems: list[str] = []
    for store in stores:
        barrier.wait(timeout=60)
        async with store.open() as ledger:
            problems += await ledger.verify()
    return problems


def open_and_verify(stores: list[StoreSpec], barrier: Barrier, results: Queue[list[str]]) -> None:
    """Process entry point: open (creating them) these ledgers at the same moment as the others."""
    try:
        results.put(asyncio.run(_open_and_verify(stores, barrier)))
    except (sqlite3.Error, GatewayError, BrokenBarrierError) as exc:
        # report it rather than leave the others waiting at the barrier
        barrier.abort()
        results.put([f"{type(exc).__name__}: {exc}"])


async def _claim_free_calls(store: StoreSpec, worker: int, calls: int, limit: int, barrier: Barrier) -> int:
    async with store.open() as ledger:
        barrier.wait(timeout=60)  # start all processes' claims together
        claims = [
            FreeCall(f"free-{worker}-{i}", "alice", "weather", "*", "get_forecast", "2026-03-01", limit)
            for i in range(calls)
        ]
        return sum(await asyncio.gather(*(ledger.claim_free_call(claim) for claim in claims)))


def claim_free_calls(
    store: StoreSpec, worker: int, calls: int, limit: int, barrier: Barrier, results: Queue[int]
) -> None:
    """Process entry point: attempt ``calls`` free-call claims against ``limit``; report how many won."""
    results.put(asyncio.run(_claim_free_calls(store, worker, calls, limit, barrier)))
