"""A lone hold, capture or void on PostgreSQL (a batch of one: what a single caller sends) commits
as ONE auto-commit statement, a call of a session-local function, instead of the batch path's
BEGIN, lock, write, COMMIT. It takes the same locks in the same order, makes the same checks and
writes the same rows; anything but the plain case (a replay, a settled hold, a party that does not
resolve) writes nothing and is answered by the batch path.

The oracle for "the same outcome" is the SQLite store running the same operations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.ledger.base import MAX_BALANCE, AccountKind, HoldStatus
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.postgres.lone import _prepare_settle_connection
from gateway.ledger.sqlite import SqliteLedger

from .conftest import FakeClock, HoldFactory, StoreSpec
from .test_postgres_batching import _outcome, _prepare, _round, _state


def _spy_on_batches(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record the operation kinds of every batch that takes the batch path (``_tx_batch``)."""
    seen: list[list[str]] = []
    run_batch = PostgresLedger._tx_batch

    async def spy(self: PostgresLedger, conn: asyncpg.Connection, batch: Any) -> Any:
        seen.append([type(op).__name__ for op in batch])
        return await run_batch(self, conn, batch)

    monkeypatch.setattr(PostgresLedger, "_tx_batch", spy)
    return seen


@asynccontextmanager
async def _one_at_a_time_beside_sqlite(
    pg: StoreSpec, tmp_path: Path, clock: FakeClock, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[PostgresLedger, SqliteLedger, list[list[str]], int]]:
    """Run the batching scenario's operations one at a time on PostgreSQL and on SQLite (the
    oracle), assert both gave the same outcomes, and yield both stores (still open), the kinds of
    the batches that took PostgreSQL's batch path and the number of operations."""
    postgres = PostgresLedger(pg.location, clock=clock, schema=pg.schema)
    oracle = SqliteLedger(tmp_path / "oracle.db", clock=clock)
    async with postgres, oracle:
        pg_setup, oracle_setup = await _prepare(postgres, hold_req), await _prepare(oracle, hold_req)
        clock.advance(5)
        seen = _spy_on_batches(monkeypatch)
        alone_pg = [await _outcome(op) for op in _round(postgres, pg_setup, hold_req)]
        alone_oracle = [await _outcome(op) for op in _round(oracle, oracle_setup, hold_req)]
        assert alone_pg == alone_oracle
        yield postgres, oracle, seen, len(alone_pg)


async def test_operations_one_at_a_time_get_what_sqlite_gives_and_only_the_unusual_ones_take_the_batch_path(
    pg: StoreSpec, tmp_path: Path, clock: FakeClock, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with _one_at_a_time_beside_sqlite(pg, tmp_path, clock, hold_req, monkeypatch) as (postgres, oracle, seen, _):
        # new holds (granted, or refused by the balance), the partial capture and the voids went
        # through one statement each; the replays, the conflicts, the parties that do not resolve, a
        # hold the key's cap refuses (decided without writing), the captures of settled or missing
        # holds and the renewal took the batch path
        assert seen == [["_HoldOp"]] * 6 + [["_CaptureOp"]] * 4 + [["_RenewOp"]]
        call_ids = sorted(
            {"p-renew", "p-capture", "p-void", "done", "released", "n-ok", "n-cap", "n-poor", "n-bob", "n-cap-now-fits"}
        )
        assert await _state(postgres, call_ids) == await _state(oracle, call_ids)
        assert await postgres.verify() == []


async def test_a_lone_capture_splits_a_fee_of_any_size_exactly_as_a_batched_capture_does(
    pg: StoreSpec, clock: FakeClock, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fee * amount overflows BIGINT here (2 * 10**28; every amount and balance still within MAX_BALANCE):
    the lone path must round as the batch path does."""
    held, fee, captured = 3 * 10**14 + 7, 10**14 + 3, 2 * 10**14 + 1
    assert fee * captured > 2**63 and 2 * held + 1 <= MAX_BALANCE
    async with PostgresLedger(pg.location, clock=clock, schema=pg.schema) as ledger:
        await ledger.create_user("alice")
        await ledger.create_developer("acme")
        await ledger.topup("alice", 2 * held + 1)
        for call_id, amount, call_fee in (("lone", held, fee), ("batched", held, fee), ("company", 1, 0)):
            assert (await ledger.hold(hold_req(call_id, amount=amount, fee=call_fee))).ok
        seen = _spy_on_batches(monkeypatch)
        lone = await ledger.capture("lone", captured)
        assert seen == []
        batched, _ = await asyncio.gather(ledger.capture("batched", captured), ledger.capture("company"))
        assert seen == [["_CaptureOp", "_CaptureOp"]]

        assert lone.fee == batched.fee == fee * captured // held
        assert (lone.amount, lone.user, lone.developer, lone.refunded) == (captured, "alice", "acme", 0)
        assert lone.balance_after == held - captured  # "batched" and "company" still held then
        assert await ledger.get_charge(lone.id) == lone
        platform = await ledger.get_account(AccountKind.PLATFORM_FEE, "system")
        assert platform.balance == 2 * (fee * captured // held)
        assert await ledger.verify() == []


async def test_a_lone_hold_or_void_commits_without_waiting_for_the_disk_and_a_lone_capture_waits(
    pg: StoreSpec, clock: FakeClock, hold_req: HoldFactory
) -> None:
    """The functions set ``synchronous_commit`` for the transaction they run in: off for a hold or a
    void (visible to every replica at once; a crash voids those holds anyway), untouched (on) for a
    capture. Called here inside an explicit transaction, so the setting can be read back."""
    async with PostgresLedger(pg.location, clock=clock, schema=pg.schema) as ledger:
        await ledger.create_user("alice")
        await ledger.create_developer("acme")
        await ledger.topup("alice", 1_000)
        platform = (await ledger.get_account(AccountKind.PLATFORM_FEE, "system")).id
    conn = await pg.pg_connect()
    try:
        await _prepare_settle_connection(conn)
        hold_args = ("alice", "acme", "weather", "tools/call", "forecast", 100, 0, "test", clock(), 30.0)
        hold = "SELECT * FROM pg_temp.agentpay_hold_v1($1, NULL, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        capture = "SELECT * FROM pg_temp.agentpay_capture_v1($1, NULL, $2, $3)"

        await conn.execute("SET synchronous_commit = on")  # durable, whatever the server's default

        async def run(sql: str, *args: object) -> tuple[Any, str]:
            async with conn.transaction():
                row = await conn.fetchrow(sql, *args)
                return row[0], await conn.fetchval("SHOW synchronous_commit")

        assert await run(hold, "a", *hold_args) == (HoldStatus.OK, "off")
        assert await run(hold, "b", *hold_args) == (HoldStatus.OK, "off")
        assert await run("SELECT pg_temp.agentpay_void_v1($1, $2)", "a", clock()) == (True, "off")
        assert await run(capture, "b", clock(), platform) == ("captured", "on")
        # not the plain case: nothing written, left to the batch path, no setting changed
        assert await run(hold, "b", *hold_args) == (None, "on")
        assert await run(capture, "a", clock(), platform) == (None, "on")
    finally:
        await conn.close()
    async with PostgresLedger(pg.location, clock=clock, schema=pg.schema) as ledger:
        alice = await ledger.get_account(AccountKind.USER, "alice")
        assert (alice.balance, alice.held) == (900, 0)
        assert await ledger.verify() == []


async def test_without_the_session_functions_as_behind_a_transaction_pooler_every_operation_takes_the_batch_path(
    pg: StoreSpec, tmp_path: Path, clock: FakeClock, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a pooler in transaction mode a statement may land on a server connection where
    ``_prepare_settle_connection`` never ran: the call fails with "function does not exist", writes
    nothing, and the batch path answers it, with the same outcomes as ever."""

    async def functions_never_created(conn: asyncpg.Connection) -> None:
        return None

    monkeypatch.setattr("gateway.ledger.postgres.lone._prepare_settle_connection", functions_never_created)
    async with _one_at_a_time_beside_sqlite(pg, tmp_path, clock, hold_req, monkeypatch) as (
        postgres,
        oracle,
        seen,
        operations,
    ):
        assert len(seen) == operations  # every operation, the plain ones too
        call_ids = sorted({"p-capture", "p-void", "n-ok", "n-cap", "n-poor"})
        assert await _state(postgres, call_ids) == await _state(oracle, call_ids)
        assert await postgres.verify() == []


async def test_a_settle_connection_that_cannot_create_the_functions_still_opens_and_takes_the_batch_path(
    pg: StoreSpec, tmp_path: Path, clock: FakeClock, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A role without the TEMP privilege: creating the functions fails; the ledger opens anyway."""

    async def no_temp_privilege(conn: asyncpg.Connection) -> None:
        raise asyncpg.exceptions.InsufficientPrivilegeError("permission denied to create temporary tables")

    monkeypatch.setattr("gateway.ledger.postgres.lone._prepare_settle_connection", no_temp_privilege)
    async with _one_at_a_time_beside_sqlite(pg, tmp_path, clock, hold_req, monkeypatch) as (
        postgres,
        _,
        seen,
        operations,
    ):
        assert len(seen) == operations
        assert await postgres.verify() == []


async def test_making_the_functions_again_on_a_connection_that_has_them_is_harmless(pg: StoreSpec) -> None:
    """Behind a pooler a server connection outlives the client connection that set it up."""
    conn = await pg.pg_connect()
    try:
        await _prepare_settle_connection(conn)
        await _prepare_settle_connection(conn)
        names = await conn.fetch("SELECT proname FROM pg_proc WHERE pronamespace = pg_my_temp_schema() ORDER BY 1")
        assert [row[0] for row in names] == ["agentpay_capture_v1", "agentpay_hold_v1", "agentpay_void_v1"]
    finally:
        await conn.close()
