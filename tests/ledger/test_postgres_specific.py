"""What only PostgreSQL has: several gateway replicas (separate pools) on one database, sweepers
racing each other, connections killed mid-transaction, and the retry policy.

Every other ledger test also runs on PostgreSQL through the parametrized ``ledger`` fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from gateway.errors import Conflict, Unavailable
from gateway.ledger.base import AccountKind, HoldStatus
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.postgres.migrations import MIGRATIONS

from .conftest import FakeClock, HoldFactory, StoreSpec, blocked_behind


@pytest.fixture
async def replicas(pg: StoreSpec, clock: FakeClock) -> AsyncIterator[tuple[PostgresLedger, PostgresLedger]]:
    """Two ledgers with their own pools on one schema, like two gateway replicas; opened together
    (both race to apply the migrations), with user 'alice' and developer 'acme'."""
    a = PostgresLedger(pg.location, clock=clock, schema=pg.schema, max_size=8)
    b = PostgresLedger(pg.location, clock=clock, schema=pg.schema, max_size=8)
    await asyncio.gather(a.open(), b.open())
    try:
        await a.create_user("alice")
        await b.create_developer("acme")
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


# --- replicas -----------------------------------------------------------------------------------
async def test_200_concurrent_holds_from_two_replicas_against_100_reserve_exactly_14(
    replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory
) -> None:
    a, b = replicas
    await a.topup("alice", 100)
    outcomes = await asyncio.gather(
        *((a if i % 2 else b).hold(hold_req(f"call-{i}", amount=7, fee=1)) for i in range(200))
    )
    ok = [f"call-{i}" for i, o in enumerate(outcomes) if o.status is HoldStatus.OK]
    assert len(ok) == 100 // 7
    assert all(o.status is HoldStatus.INSUFFICIENT_FUNDS for o in outcomes if o.status is not HoldStatus.OK)
    assert min(o.available for o in outcomes) >= 0
    # capture each from the other replica, twice at once: one charge per call
    charges = await asyncio.gather(*(r.capture(call_id) for call_id in ok for r in (a, b)))
    assert len({c.id for c in charges}) == len(ok)
    account = await b.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (100 - 98, 0)
    assert await a.get_account(AccountKind.PLATFORM_FEE, "system") == await b.get_account(
        AccountKind.PLATFORM_FEE, "system"
    )
    assert await a.verify() == []


async def test_the_same_call_id_from_two_replicas_at_once_is_held_and_charged_once(
    replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory
) -> None:
    a, b = replicas
    await a.topup("alice", 1_000)
    holds = await asyncio.gather(*((a, b)[i % 2].hold(hold_req("same", amount=300)) for i in range(40)))
    assert [o.status for o in holds].count(HoldStatus.OK) == 1
    assert all(o.ok for o in holds)
    charges = await asyncio.gather(*((a, b)[i % 2].charge(hold_req("one-step", amount=200)) for i in range(40)))
    assert [c.status for c in charges].count(HoldStatus.OK) == 1
    assert len({c.charge.id for c in charges if c.charge is not None}) == 1
    account = await a.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (800, 300)
    assert await b.verify() == []


async def test_sweepers_on_two_replicas_void_each_lapsed_hold_exactly_once(
    replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory, clock: FakeClock, pg: StoreSpec
) -> None:
    a, b = replicas
    for ledger in (a, b):
        ledger.SWEEP_BATCH = 7  # many small transactions, so the sweepers interleave
    await a.create_user("bob")
    await a.topup("alice", 100_000)
    await a.topup("bob", 100_000)
    key = await a.create_key(
        user="bob", server="weather", key_hash="h-bob", prefix="ap_bob", expires_at=None, spend_limit=50_000
    )
    lapsing = 150
    await asyncio.gather(
        *(a.hold(hold_req(f"lapse-{i}", amount=10 + i, lease_s=5)) for i in range(lapsing // 2)),
        *(
            b.hold(hold_req(f"lapse-k{i}", amount=10 + i, lease_s=5, user="bob", key_id=key.id))
            for i in range(lapsing - lapsing // 2)
        ),
        *(a.hold(hold_req(f"stays-{i}", amount=3, lease_s=600)) for i in range(20)),
    )
    clock.advance(10)
    counts = await asyncio.gather(*(r.sweep() for r in (a, b) for _ in range(4)))
    assert sum(counts) == lapsing
    assert await a.sweep() == 0 and await b.sweep() == 0
    assert await pg.fetchval("SELECT COUNT(*) FROM holds WHERE state = 'voided'") == lapsing
    assert (await a.get_account(AccountKind.USER, "alice")).held == 20 * 3
    assert (await a.get_account(AccountKind.USER, "bob")).held == 0
    record = await b.find_key("h-bob")
    assert record is not None and record.held == 0
    assert await a.verify() == []


async def test_payouts_refunds_and_captures_racing_on_two_replicas_keep_every_invariant(
    replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory
) -> None:
    a, b = replicas
    await a.topup("alice", 50_000)
    for i in range(40):
        await a.hold(hold_req(f"c{i}", amount=500, fee=50))
    charges = await asyncio.gather(*((a, b)[i % 2].capture(f"c{i}") for i in range(20)))

    async def payout(r: PostgresLedger) -> int:
        try:
            return (await r.create_payout("acme", 1_000)).amount
        except Conflict:  # the earnings ran out
            return 0

    async def refund(r: PostgresLedger, charge_id: str) -> int:
        try:
            return (await r.refund(charge_id, 200, reference=f"r-{charge_id}")).amount
        except Conflict:  # the earnings were paid out
            return 0

    results = await asyncio.gather(
        *((a, b)[i % 2].capture(f"c{i}") for i in range(20, 40)),
        *(payout((a, b)[i % 2]) for i in range(30)),
        *(refund((b, a)[i % 2], c.id) for i, c in enumerate(charges)),
        *(refund((a, b)[i % 2], c.id) for i, c in enumerate(charges)),  # the same references again
    )
    paid = sum(r for r in results[20:50] if isinstance(r, int))
    developer = await a.get_account(AccountKind.DEVELOPER, "acme")
    clearing = await a.get_account(AccountKind.PAYOUT_CLEARING, "system")
    assert clearing.balance == paid and developer.balance >= 0
    for charge in charges:
        assert (await b.get_charge(charge.id)).refunded in (0, 200)
    assert await a.verify() == []


# --- crashes --------------------------------------------------------------------------------------
async def test_a_hold_whose_connection_is_killed_mid_transaction_leaves_nothing_behind(
    pg: StoreSpec, replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory
) -> None:
    ledger, _ = replicas
    await ledger.topup("alice", 1_000)
    blocker = await pg.pg_connect()
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM accounts WHERE kind = 'user' FOR NO KEY UPDATE")
            # the hold inserts its row, then its guarded UPDATE waits for alice's account row
            task = asyncio.create_task(ledger.hold(hold_req("killed", amount=400)))
            victim = await blocked_behind(blocker)
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", victim)
            with pytest.raises(Unavailable, match="lost the connection"):
                await task
    finally:
        await blocker.close()
    assert await pg.fetchval("SELECT COUNT(*) FROM holds") == 0
    assert await ledger.verify() == []
    # the pool replaced the dead connection; the caller's retry with the same call id works
    assert (await ledger.hold(hold_req("killed", amount=400))).status is HoldStatus.OK
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 400
    assert await ledger.verify() == []


async def test_a_refund_whose_connection_is_killed_after_its_first_write_is_rolled_back(
    pg: StoreSpec, replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory
) -> None:
    ledger, other = replicas
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=1_000, fee=100))
    charge = await ledger.capture("call-1")
    blocker = await pg.pg_connect()
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM accounts WHERE kind = 'developer' FOR NO KEY UPDATE")
            # the refund has raised charges.refunded, then waits for the developer's account row
            task = asyncio.create_task(ledger.refund(charge.id, 600, reference="ticket-1"))
            victim = await blocked_behind(blocker)
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", victim)
            with pytest.raises(Unavailable):
                await task
    finally:
        await blocker.close()
    assert (await other.get_charge(charge.id)).refunded == 0
    assert await pg.fetchval("SELECT COUNT(*) FROM transfers WHERE kind = 'refund'") == 0
    assert await other.verify() == []
    first = await other.refund(charge.id, 600, reference="ticket-1")
    again = await ledger.refund(charge.id, 600, reference="ticket-1")
    assert again.replayed and again.id == first.id
    assert (await ledger.get_account(AccountKind.USER, "alice")).balance == 600
    assert await ledger.verify() == []


async def test_a_capture_whose_connection_is_killed_leaves_the_hold_pending_and_capturable(
    pg: StoreSpec, replicas: tuple[PostgresLedger, PostgresLedger], hold_req: HoldFactory
) -> None:
    ledger, other = replicas
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=300, fee=30))
    blocker = await pg.pg_connect()
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM accounts WHERE kind = 'platform_fee' FOR NO KEY UPDATE")
            # the capture has locked the hold row, then waits for the platform account
            task = asyncio.create_task(ledger.capture("call-1"))
            victim = await blocked_behind(blocker)
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", victim)
            with pytest.raises(Unavailable):
                await task
    finally:
        await blocker.close()
    assert (await other.get_hold("call-1")).state.value == "pending"
    assert await pg.fetchval("SELECT COUNT(*) FROM transfers WHERE kind = 'charge'") == 0
    assert await other.verify() == []
    assert (await other.capture("call-1")).amount == 300
    assert (await ledger.capture("call-1")).amount == 300  # idempotent
    assert await ledger.verify() == []


# --- retry policy, errors, schema -----------------------------------------------------------------
async def test_a_deadlock_is_retried_only_for_idempotent_transactions(
    replicas: tuple[PostgresLedger, PostgresLedger],
) -> None:
    ledger, _ = replicas
    calls = {"idempotent": 0, "other": 0}

    def failing_once(kind: str) -> Callable[[asyncpg.Connection], Awaitable[str]]:
        async def tx(conn: asyncpg.Connection) -> str:
            calls[kind] += 1
            if calls[kind] == 1:
                raise asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
            return "done"

        return tx

    assert await ledger._run(failing_once("idempotent"), idempotent=True) == "done"
    assert calls["idempotent"] == 2
    with pytest.raises(Unavailable, match="nothing was written"):
        await ledger._run(failing_once("other"), idempotent=False)
    assert calls["other"] == 1


async def test_an_unreachable_database_is_unavailable_not_a_crash(clock: FakeClock) -> None:
    ledger = PostgresLedger("postgresql://postgres@127.0.0.1:1/test", clock=clock, schema="t_nowhere")
    with pytest.raises(Unavailable, match="cannot connect"):
        await ledger.open()
    with pytest.raises(Unavailable, match="not open"):
        await ledger.verify()


async def test_reopening_applies_no_migration_twice_and_keeps_the_system_accounts(
    pg: StoreSpec, clock: FakeClock
) -> None:
    for _ in range(3):
        async with PostgresLedger(pg.location, clock=clock, schema=pg.schema) as ledger:
            assert await ledger.verify() == []
    assert await pg.fetchval("SELECT COUNT(*) FROM schema_migrations") == len(MIGRATIONS)
    assert await pg.fetchval("SELECT COUNT(*) FROM accounts WHERE name = 'system'") == 3


async def test_the_database_refuses_an_overdraft_even_from_a_buggy_writer(
    replicas: tuple[PostgresLedger, PostgresLedger], pg: StoreSpec
) -> None:
    ledger, _ = replicas
    await ledger.topup("alice", 100)
    # A user's available may go below zero since clawbacks (migration 0008: a refund or dispute after
    # the money was spent), so the database no longer refuses held > balance for users; ledger verify
    # reports one no clawback explains. It still refuses a negative hold and any other account's overdraft.
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE accounts SET held = -1 WHERE kind = 'user'")
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE accounts SET balance = -1 WHERE kind = 'developer'")
    with pytest.raises(asyncpg.RaiseError, match="immutable"):
        await pg.execute("UPDATE postings SET amount = amount + 1")
    assert await ledger.verify() == []
