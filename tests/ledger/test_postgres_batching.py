"""Group commit on PostgreSQL: the holds, captures, voids and lease renewals one process issues
concurrently are committed together in one transaction, and each caller still gets exactly the
result or exception it would get alone.

The oracle for "what it would get alone" is the SQLite store running the same operations one at a
time, in the same order."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound, Unavailable
from gateway.ledger.base import AccountKind, HoldOutcome, HoldStatus
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger

from .conftest import FakeClock, HoldFactory, StoreSpec, blocked_behind

AnyLedger = SqliteLedger | PostgresLedger


@pytest.fixture
async def ledger(pg: StoreSpec, clock: FakeClock) -> AsyncIterator[PostgresLedger]:
    """An open PostgreSQL ledger with user 'alice' (10,000) and developer 'acme'."""
    opened = PostgresLedger(pg.location, clock=clock, schema=pg.schema, max_size=5)
    await opened.open()
    try:
        await opened.create_user("alice")
        await opened.create_developer("acme")
        await opened.topup("alice", 10_000)
        yield opened
    finally:
        await opened.close()


async def _transactions_that_wrote(pg: StoreSpec, call_ids: list[str]) -> int:
    """How many transactions last wrote these hold rows (their xmin)."""
    return int(await pg.fetchval("SELECT COUNT(DISTINCT xmin::text) FROM holds WHERE call_id = ANY(?)", call_ids))


# --- every operation gets what it would get alone -------------------------------------------------
@dataclass(frozen=True)
class Setup:
    alice_key: str
    bob_key: str


async def _prepare(ledger: AnyLedger, hold_req: HoldFactory) -> Setup:
    """The same starting ledger on each store: pending, captured and voided holds, a key with a cap."""
    for user in ("alice", "bob"):
        await ledger.create_user(user)
    await ledger.create_developer("acme")
    await ledger.topup("alice", 10_000)
    await ledger.topup("bob", 50)
    alice_key = await ledger.create_key(
        user="alice", server="weather", key_hash="h-alice", prefix="ap_a", expires_at=None, spend_limit=3_000
    )
    bob_key = await ledger.create_key(
        user="bob", server="weather", key_hash="h-bob", prefix="ap_b", expires_at=None, spend_limit=None
    )
    for call_id, amount, key in (
        ("done", 700, alice_key.id),
        ("released", 300, None),
        ("p-capture", 900, None),
        ("p-replay", 400, None),
        ("p-conflict", 400, None),
        ("p-too-much", 200, None),
        ("p-void", 1_200, alice_key.id),
        ("p-renew", 100, None),
    ):
        assert (await ledger.hold(hold_req(call_id, amount=amount, fee=amount // 10, key_id=key))).ok
    await ledger.capture("done")
    assert await ledger.void("released")
    return Setup(alice_key.id, bob_key.id)


def _round(ledger: AnyLedger, setup: Setup, hold_req: HoldFactory) -> list[Callable[[], Awaitable[Any]]]:
    """One operation per call id, in this order: each outcome depends on the ones before it."""
    return [
        lambda: ledger.hold(hold_req("n-ok", amount=1_000, fee=100, key_id=setup.alice_key)),
        lambda: ledger.hold(hold_req("n-cap", amount=1_200, key_id=setup.alice_key)),  # 700+1200+1000 of 3000 spent
        lambda: ledger.hold(hold_req("n-poor", amount=100, user="bob", key_id=setup.bob_key)),
        lambda: ledger.hold(hold_req("p-replay", amount=400, fee=40)),
        lambda: ledger.hold(hold_req("p-conflict", amount=401)),
        lambda: ledger.hold(hold_req("n-nobody", amount=5, user="nobody")),
        lambda: ledger.hold(hold_req("n-other-key", amount=5, key_id=setup.bob_key)),
        lambda: ledger.hold(hold_req("n-no-key", amount=5, key_id="key_missing")),
        lambda: ledger.capture("p-capture", 600),
        lambda: ledger.capture("done"),
        lambda: ledger.capture("released"),
        lambda: ledger.capture("nothing"),
        lambda: ledger.capture("p-too-much", 201),
        lambda: ledger.void("p-void"),
        lambda: ledger.void("released"),
        lambda: ledger.void("nothing"),
        lambda: ledger.renew(["p-renew", "done", "p-capture", "nothing"], 90.0),
        lambda: ledger.hold(hold_req("n-bob", amount=40, user="bob", key_id=setup.bob_key)),
        lambda: ledger.hold(hold_req("n-cap-now-fits", amount=1_100, key_id=setup.alice_key)),  # p-void released
    ]


async def _outcome(op: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await op()
    except (Conflict, IdempotencyConflict, InvalidInput, NotFound) as exc:
        return type(exc)


async def _state(ledger: AnyLedger, call_ids: list[str]) -> list[Any]:
    """Balances, key spend and the holds, without the ids each store picks for itself."""
    state: list[Any] = []
    for kind, name in (
        (AccountKind.USER, "alice"),
        (AccountKind.USER, "bob"),
        (AccountKind.DEVELOPER, "acme"),
        (AccountKind.PLATFORM_FEE, "system"),
    ):
        account = await ledger.get_account(kind, name)
        state.append((kind, name, account.balance, account.held))
    state.append(sorted((key.prefix, key.spent, key.held) for key in await ledger.list_keys()))
    for call_id in call_ids:
        try:
            state.append(await ledger.get_hold(call_id))
        except NotFound:
            state.append(None)
    return state


async def test_concurrent_operations_commit_as_one_transaction_and_each_gets_what_it_would_alone(
    pg: StoreSpec, tmp_path: Path, clock: FakeClock, hold_req: HoldFactory
) -> None:
    postgres = PostgresLedger(pg.location, clock=clock, schema=pg.schema)
    oracle = SqliteLedger(tmp_path / "oracle.db", clock=clock)
    async with postgres, oracle:
        pg_setup, oracle_setup = await _prepare(postgres, hold_req), await _prepare(oracle, hold_req)
        clock.advance(5)
        batched = await asyncio.gather(*(_outcome(op) for op in _round(postgres, pg_setup, hold_req)))
        alone = [await _outcome(op) for op in _round(oracle, oracle_setup, hold_req)]

        assert batched == alone
        statuses = [o.status for o in batched if isinstance(o, HoldOutcome)]
        assert statuses == [
            HoldStatus.OK,
            HoldStatus.SPEND_LIMIT,
            HoldStatus.INSUFFICIENT_FUNDS,
            HoldStatus.REPLAYED,
            HoldStatus.OK,
            HoldStatus.OK,
        ]
        assert [o for o in batched if isinstance(o, type)] == [
            IdempotencyConflict,
            NotFound,
            InvalidInput,
            NotFound,
            Conflict,
            NotFound,
            InvalidInput,
        ]
        call_ids = sorted({"p-renew", "p-capture", "p-void", "done", "released", "n-ok", "n-cap", "n-bob"})
        assert await _state(postgres, call_ids) == await _state(oracle, call_ids)
        # every row the round wrote was written by one transaction
        assert await _transactions_that_wrote(pg, ["n-ok", "n-bob", "n-cap-now-fits", "p-capture", "p-void"]) == 1
        assert await postgres.verify() == []
        assert await oracle.verify() == []


async def test_an_operation_issued_while_the_drainer_lets_go_of_its_connection_is_still_run(
    ledger: PostgresLedger, hold_req: HoldFactory
) -> None:
    """One caller, each operation issued the moment the previous returns: the next one is queued
    while the drainer is releasing its connection, and must be taken, not stranded."""
    async with asyncio.timeout(60):
        for i in range(40):
            assert (await ledger.hold(hold_req(f"seq-{i}", amount=10))).ok
            assert (await ledger.capture(f"seq-{i}")).amount == 10
    assert (await ledger.get_account(AccountKind.USER, "alice")).balance == 10_000 - 400


async def test_operations_on_the_same_call_run_in_order_in_successive_batches(
    ledger: PostgresLedger, hold_req: HoldFactory
) -> None:
    hold, charge, again, released, replay = await asyncio.gather(
        ledger.hold(hold_req("c", amount=500, fee=50)),
        ledger.capture("c"),
        ledger.capture("c"),
        ledger.void("c"),
        ledger.hold(hold_req("c", amount=500, fee=50)),
    )
    assert hold.status is HoldStatus.OK
    assert charge == again and (charge.amount, charge.fee, charge.balance_after) == (500, 50, 9_500)
    assert released is False
    assert replay.status is HoldStatus.REPLAYED and replay.available == 9_500
    assert await ledger.verify() == []


# --- failures -------------------------------------------------------------------------------------
async def test_an_operation_the_database_refuses_fails_alone(
    ledger: PostgresLedger, pg: StoreSpec, hold_req: HoldFactory
) -> None:
    """A write the per-operation checks cannot foresee (here a constraint added behind the ledger's
    back) rolls the batch back; its operations then run one by one and only that one fails."""
    for i in range(3):
        assert (await ledger.hold(hold_req(f"earlier-{i}", amount=100))).ok
    await pg.execute("ALTER TABLE holds ADD CONSTRAINT test_no_poison CHECK (name <> 'poison')")
    results = await asyncio.gather(
        *(ledger.hold(hold_req(f"fine-{i}", amount=10)) for i in range(5)),
        ledger.hold(hold_req("bad", amount=10, name="poison")),
        *(ledger.capture(f"earlier-{i}") for i in range(3)),
        return_exceptions=True,
    )
    assert [r.status for r in results[:5] if isinstance(r, HoldOutcome)] == [HoldStatus.OK] * 5
    assert isinstance(results[5], Conflict) and "test_no_poison" in str(results[5])
    assert [getattr(r, "amount", None) for r in results[6:]] == [100] * 3
    alice = await ledger.get_account(AccountKind.USER, "alice")
    assert (alice.balance, alice.held) == (10_000 - 300, 50)
    assert await ledger.verify() == []


async def test_a_batch_whose_connection_dies_fails_every_caller_and_writes_nothing(
    ledger: PostgresLedger, pg: StoreSpec, hold_req: HoldFactory
) -> None:
    assert (await ledger.hold(hold_req("pending", amount=100))).ok
    blocker = await pg.pg_connect()
    try:
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM accounts WHERE kind = 'user' FOR NO KEY UPDATE")
            tasks: list[asyncio.Task[Any]] = [
                asyncio.create_task(ledger.hold(hold_req(f"h-{i}", amount=10))) for i in range(8)
            ]
            tasks.append(asyncio.create_task(ledger.capture("pending")))
            victim = await blocked_behind(blocker)
            assert await blocker.fetchval("SELECT pg_terminate_backend($1)", victim)
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await blocker.close()
    assert all(isinstance(r, Unavailable) for r in results)
    assert await pg.fetchval("SELECT COUNT(*) FROM holds") == 1
    assert await pg.fetchval("SELECT COUNT(*) FROM charges") == 0
    # the drainer took a new connection: the retries go through
    assert all(o.ok for o in await asyncio.gather(*(ledger.hold(hold_req(f"h-{i}", amount=10)) for i in range(8))))
    assert (await ledger.capture("pending")).amount == 100
    assert await ledger.verify() == []


async def test_a_caller_cancelled_before_its_batch_starts_writes_nothing(
    ledger: PostgresLedger, pg: StoreSpec, hold_req: HoldFactory
) -> None:
    task = asyncio.create_task(ledger.hold(hold_req("gone", amount=100)))
    await asyncio.sleep(0)  # one turn of the loop, no waiting: the task queues its hold, the drainer has not run
    task.cancel()
    assert (await ledger.hold(hold_req("next", amount=100))).ok  # queued after it: the queue was drained
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await pg.fetchval("SELECT COUNT(*) FROM holds WHERE call_id = 'gone'") == 0
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 100


# --- durability -----------------------------------------------------------------------------------
async def test_only_batches_with_a_capture_wait_for_the_disk(
    ledger: PostgresLedger, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Holds, voids and renewals commit with synchronous_commit off (visible to every replica, not
    forced to disk); a batch with a capture commits durably."""
    seen: list[tuple[set[str], str]] = []
    run_batch = PostgresLedger._tx_batch

    async def spy(self: PostgresLedger, conn: asyncpg.Connection, batch: Any) -> Any:
        outcomes = await run_batch(self, conn, batch)
        seen.append(({type(op).__name__ for op in batch}, await conn.fetchval("SHOW synchronous_commit")))
        return outcomes

    monkeypatch.setattr(PostgresLedger, "_tx_batch", spy)
    await asyncio.gather(*(ledger.hold(hold_req(f"c-{i}", amount=10)) for i in range(4)))
    await asyncio.gather(ledger.void("c-0"), ledger.renew(["c-1"], 60.0))
    await asyncio.gather(ledger.capture("c-1"), ledger.hold(hold_req("c-4", amount=10)))
    assert seen == [
        ({"_HoldOp"}, "off"),
        ({"_VoidOp", "_RenewOp"}, "off"),
        ({"_CaptureOp", "_HoldOp"}, "on"),
    ]


# --- replicas -------------------------------------------------------------------------------------
async def test_two_replicas_batching_holds_captures_and_voids_never_overdraw(
    pg: StoreSpec, clock: FakeClock, hold_req: HoldFactory
) -> None:
    replicas = [PostgresLedger(pg.location, clock=clock, schema=pg.schema) for _ in range(2)]
    await asyncio.gather(*(r.open() for r in replicas))
    try:
        a, b = replicas
        await a.create_user("alice")
        await a.create_developer("acme")
        await b.topup("alice", 1_000)
        key = await a.create_key(
            user="alice", server="weather", key_hash="h", prefix="ap_h", expires_at=None, spend_limit=700
        )

        async def call(i: int) -> tuple[bool, int]:
            """Hold on one replica, then capture (or, for every fifth call, void) on the other."""
            outcome = await replicas[i % 2].hold(hold_req(f"call-{i}", amount=7, fee=1, key_id=key.id))
            if not outcome.ok:
                assert outcome.status is HoldStatus.SPEND_LIMIT
                return False, 0
            if i % 5 == 0:
                assert await replicas[(i + 1) % 2].void(f"call-{i}")
                return True, 0
            return True, (await replicas[(i + 1) % 2].capture(f"call-{i}")).amount

        results = await asyncio.gather(*(call(i) for i in range(300)))
        charged = sum(amount for _, amount in results)
        assert sum(ok for ok, _ in results) >= 700 // 7  # a hold was refused only with the cap fully reserved
        assert 0 < charged <= 700 and charged % 7 == 0
        alice = await a.get_account(AccountKind.USER, "alice")
        record = await b.find_key("h")
        assert record is not None and (record.spent, record.held) == (charged, 0)
        assert (alice.balance, alice.held) == (1_000 - charged, 0)
        assert await a.verify() == []
    finally:
        await asyncio.gather(*(r.close() for r in replicas))
