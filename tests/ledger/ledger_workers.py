"""Code run in separate OS processes by the cross-process tests (importable by spawned children)."""

from __future__ import annotations

import asyncio
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from gateway.ledger.base import HoldRequest
from gateway.ledger.sqlite import SqliteLedger


async def _hold_and_capture(path: Path, worker: int, calls: int, price: int, barrier: Barrier) -> int:
    async with SqliteLedger(path) as ledger:
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


def hold_and_capture(path: str, worker: int, calls: int, price: int, barrier: Barrier, results: Queue[int]) -> None:
    """Process entry point: attempt ``calls`` holds+captures at ``price``; report the total captured."""
    results.put(asyncio.run(_hold_and_capture(Path(path), worker, calls, price, barrier)))


async def _open_and_verify(path: Path, barrier: Barrier) -> list[str]:
    barrier.wait(timeout=60)
    async with SqliteLedger(path) as ledger:
        return await ledger.verify()


def open_and_verify(path: str, barrier: Barrier, results: Queue[list[str]]) -> None:
    """Process entry point: open (creating if need be) the ledger at the same moment as others."""
    results.put(asyncio.run(_open_and_verify(Path(path), barrier)))
