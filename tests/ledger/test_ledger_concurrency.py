"""No overdraft under concurrency: within one process (asyncio) and across OS processes, on every store."""

from __future__ import annotations

import asyncio
import multiprocessing
from pathlib import Path

import pytest

from gateway.ledger.base import AccountKind, HoldStatus
from gateway.ledger.interfaces import Ledger
from gateway.ledger.postgres import migrations as migrations_postgres
from gateway.ledger.sqlite import migrations as migrations_sqlite

from .conftest import STORES, HoldFactory, StoreSpec, run_sync
from .ledger_workers import hold_and_capture, open_and_verify


async def test_200_concurrent_holds_of_7_against_100_reserve_exactly_14(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 100)
    outcomes = await asyncio.gather(*(ledger.hold(hold_req(f"call-{i}", amount=7)) for i in range(200)))
    ok = [f"call-{i}" for i, o in enumerate(outcomes) if o.status is HoldStatus.OK]
    assert len(ok) == 14
    assert all(o.status is HoldStatus.INSUFFICIENT_FUNDS for o in outcomes if o.status is not HoldStatus.OK)
    assert min(o.available for o in outcomes) >= 0
    await asyncio.gather(*(ledger.capture(call_id) for call_id in ok))
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (100 - 98, 0)
    assert await ledger.verify() == []


async def test_verify_sees_a_consistent_snapshot_while_traffic_runs(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 10_000)

    async def traffic(i: int) -> None:
        if (await ledger.hold(hold_req(f"call-{i}", amount=13, fee=2))).ok:
            if i % 3:
                await ledger.capture(f"call-{i}")
            else:
                await ledger.void(f"call-{i}")

    async def audits() -> list[list[str]]:
        return [await ledger.verify() for _ in range(20)]

    reports, _ = await asyncio.gather(audits(), asyncio.gather(*(traffic(i) for i in range(300))))
    assert all(report == [] for report in reports)
    assert await ledger.verify() == []


def test_holds_from_four_processes_on_one_file_capture_exactly_what_the_balance_allows(
    store: StoreSpec,
) -> None:
    balance, price, processes, calls = 1_000, 7, 4, 50

    async def setup() -> None:
        async with store.open() as ledger:
            await ledger.create_user("alice")
            await ledger.create_developer("acme")
            await ledger.topup("alice", balance)

    asyncio.run(setup())
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=hold_and_capture, args=(store, n, calls, price, barrier, results)) for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    totals = [results.get(timeout=100) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0

    assert sum(totals) == (balance // price) * price

    async def audit() -> tuple[int, int, list[str]]:
        async with store.open() as ledger:
            account = await ledger.get_account(AccountKind.USER, "alice")
            return account.balance, account.held, await ledger.verify()

    final_balance, held, problems = asyncio.run(audit())
    assert (final_balance, held, problems) == (balance - (balance // price) * price, 0, [])


@pytest.mark.parametrize("kind", STORES)
def test_processes_opening_a_new_file_at_once_all_succeed_and_create_the_schema_once(kind: str, tmp_path: Path) -> None:
    processes, rounds = 6, 4  # the race is probabilistic: several fresh files make it likely to bite
    stores = [StoreSpec.fresh(kind, tmp_path, f"fresh-{n}") for n in range(rounds)]
    migrations = migrations_sqlite.MIGRATIONS if kind == "sqlite" else migrations_postgres.MIGRATIONS
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    workers = [ctx.Process(target=open_and_verify, args=(stores, barrier, results)) for _ in range(processes)]
    try:
        for worker in workers:
            worker.start()
        reports = [results.get(timeout=100) for _ in workers]
        for worker in workers:
            worker.join(timeout=30)
            assert worker.exitcode == 0
        assert reports == [[]] * processes
        for store in stores:
            assert run_sync(store.fetchval("SELECT COUNT(*) FROM schema_migrations")) == len(migrations)
            assert run_sync(store.fetchval("SELECT COUNT(*) FROM accounts WHERE name = 'system'")) == 3
    finally:
        for store in stores:
            run_sync(store.drop())
