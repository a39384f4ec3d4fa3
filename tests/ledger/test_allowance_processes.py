"""A free allowance is granted exactly once across gateway processes: four OS processes claiming at
once from one SQLite file (or one PostgreSQL schema) win exactly ``free_calls_per_day`` claims."""

from __future__ import annotations

import asyncio
import multiprocessing

from .conftest import StoreSpec
from .ledger_workers import claim_free_calls


def test_free_calls_claimed_from_four_processes_at_once_are_granted_exactly_the_limit(store: StoreSpec) -> None:
    limit, processes, calls = 7, 4, 20

    async def setup() -> None:
        async with store.open() as ledger:
            await ledger.create_user("alice")
            await ledger.create_developer("acme")

    asyncio.run(setup())
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=claim_free_calls, args=(store, n, calls, limit, barrier, results)) for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    won = [results.get(timeout=100) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    async def used() -> int:
        async with store.open() as ledger:
            return await ledger.free_calls_used("alice", "weather", "*", "2026-03-01")

    assert sum(won) == limit
    assert asyncio.run(used()) == limit
