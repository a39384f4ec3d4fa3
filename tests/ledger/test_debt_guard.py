"""The database itself refuses an overdraft again (migration 0010), while clawbacks still take a user
below zero: a user's ``debt`` is raised only by a clawback, to the shortfall it leaves, and lowered by
each credit, so a write that escaped the stores' conditional UPDATEs (a bug, another tool on the
database) and would take a user's available balance below ``-debt`` is refused, on both stores."""

from __future__ import annotations

import sqlite3
from typing import Any

import asyncpg
import pytest

from gateway.errors import Conflict
from gateway.ledger.base import AccountKind
from gateway.ledger.interfaces import Ledger
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.postgres import migrations as postgres_migrations
from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.sqlite import migrations as sqlite_migrations
from gateway.ledger.sqlite.store import _statements as sqlite_statements

from .conftest import HoldFactory, StoreSpec

REFUSED = (sqlite3.IntegrityError, asyncpg.CheckViolationError)


async def state(ledger: Ledger, store: StoreSpec) -> tuple[int, int]:
    """alice's (available, debt)."""
    account = await ledger.get_account(AccountKind.USER, "alice")
    debt = await store.fetchval("SELECT debt FROM accounts WHERE id = ?", account.id)
    return account.available, int(debt)


async def test_a_direct_write_that_would_overdraw_a_user_is_refused_by_the_database(
    ledger: Ledger, store: StoreSpec
) -> None:
    assert "0010_user_debt_guard" in await ledger.applied_migrations()
    await ledger.topup("alice", 1_000)
    user_id = (await ledger.get_account(AccountKind.USER, "alice")).id

    with pytest.raises(REFUSED):  # a hold without the conditional UPDATE's guard
        await store.execute("UPDATE accounts SET held = held + 1001 WHERE id = ?", user_id)
    with pytest.raises(REFUSED):  # a debit that is neither a capture nor a clawback
        await store.execute("UPDATE accounts SET balance = balance - 1001 WHERE id = ?", user_id)
    with pytest.raises(REFUSED):  # nor can a writer grant itself room
        await store.execute("UPDATE accounts SET debt = -1 WHERE id = ?", user_id)
    await store.execute("UPDATE accounts SET held = held + 1000 WHERE id = ?", user_id)  # exactly affordable
    assert await store.fetchval("SELECT balance - held FROM accounts WHERE id = ?", user_id) == 0


async def test_a_clawback_with_holds_outstanding_then_captures_and_top_ups_keep_the_debt_exact(
    ledger: Ledger, store: StoreSpec, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 1_000)
    assert (await ledger.hold(hold_req("c1", amount=500))).ok
    assert (await ledger.hold(hold_req("c2", amount=300))).ok
    user_id = (await ledger.get_account(AccountKind.USER, "alice")).id

    await ledger.clawback("alice", 1_000, "stripe:dispute:dp_1:withdrawn")
    assert await state(ledger, store) == (-800, 800)  # balance 0, 800 held
    with pytest.raises(REFUSED):  # already in debt: not one millicent further
        await store.execute("UPDATE accounts SET held = held + 1 WHERE id = ?", user_id)

    await ledger.capture("c1")  # holds taken before the clawback still capture
    assert await state(ledger, store) == (-800, 800)
    await ledger.topup("alice", 300)  # a credit lowers the debt to the shortfall it leaves
    assert await state(ledger, store) == (-500, 500)
    with pytest.raises(REFUSED):
        await store.execute("UPDATE accounts SET balance = balance - 1 WHERE id = ?", user_id)

    assert await ledger.void("c2")  # a void raises the available balance, the debt stays a looser bound
    assert await state(ledger, store) == (-200, 500)
    await ledger.clawback("alice", 100, "stripe:refund:re_1")  # a second clawback: the larger of the two
    assert await state(ledger, store) == (-300, 500)
    await ledger.topup("alice", 400)  # debt repaid: back to the plain "never below zero"
    assert await state(ledger, store) == (100, 0)
    with pytest.raises(REFUSED):
        await store.execute("UPDATE accounts SET held = held + 101 WHERE id = ?", user_id)
    assert (await ledger.hold(hold_req("c3", amount=100))).ok
    assert await ledger.verify() == []


async def test_a_refund_of_a_charge_lowers_the_debt_of_a_user_in_debt(
    ledger: Ledger, store: StoreSpec, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 1_000)
    assert (await ledger.hold(hold_req("c1", amount=600))).ok
    charge = await ledger.capture("c1")
    await ledger.clawback("alice", 1_000, "stripe:refund:re_2")
    assert await state(ledger, store) == (-600, 600)

    await ledger.refund(charge.id, 400)

    assert await state(ledger, store) == (-200, 200)
    assert await ledger.verify() == []


GUARD = "0010_user_debt_guard"


def _before_guard(migrations: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return migrations[: [name for name, _ in migrations].index(GUARD)]


async def _ledger_before_0010(store: StoreSpec) -> None:
    """The store's schema as the migrations before 0010 left it, with a user already in debt (avail
    -800: balance 200, 1,000 held, allowed since 0008) and one never clawed back."""
    if store.kind == "sqlite":
        with sqlite3.connect(store.location) as conn:
            conn.execute(sqlite_migrations.SCHEMA_MIGRATIONS_TABLE)
            for name, script in _before_guard(sqlite_migrations.MIGRATIONS):
                for statement in sqlite_statements(script):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (name,))
    else:
        admin = await asyncpg.connect(store.location)
        try:
            await admin.execute(f'CREATE SCHEMA "{store.schema}"')
        finally:
            await admin.close()
        conn = await store.pg_connect()
        try:
            await conn.execute(postgres_migrations.SCHEMA_MIGRATIONS_TABLE)
            for name, script in _before_guard(postgres_migrations.MIGRATIONS):
                await conn.execute(script)
                await conn.execute("INSERT INTO schema_migrations VALUES ($1, 0)", name)
        finally:
            await conn.close()
    for name, balance, held in (("alice", 200, 1_000), ("bob", 500, 0)):
        await store.execute(
            "INSERT INTO accounts (kind, name, balance, held, created_at) VALUES ('user', ?, ?, ?, 0)",
            name,
            balance,
            held,
        )


async def test_the_upgrade_gives_a_user_already_in_debt_its_shortfall_and_guards_everyone(
    store: StoreSpec,
) -> None:
    await _ledger_before_0010(store)
    ledger = store.open()
    await ledger.open()  # applies 0010 to rows written before it
    try:
        assert GUARD in await ledger.applied_migrations()
        debts = {
            name: await store.fetchval("SELECT debt FROM accounts WHERE kind = 'user' AND name = ?", name)
            for name in ("alice", "bob")
        }
        assert debts == {"alice": 800, "bob": 0}
        bob = (await ledger.get_account(AccountKind.USER, "bob")).id
        alice = (await ledger.get_account(AccountKind.USER, "alice")).id
        with pytest.raises(REFUSED):
            await store.execute("UPDATE accounts SET held = held + 501 WHERE id = ?", bob)
        with pytest.raises(REFUSED):
            await store.execute("UPDATE accounts SET held = held + 1 WHERE id = ?", alice)
    finally:
        await ledger.close()


async def test_a_store_write_that_would_overdraw_is_answered_as_a_conflict_naming_the_rule(
    ledger: Ledger, store: StoreSpec
) -> None:
    await ledger.topup("alice", 1_000)
    user_id = (await ledger.get_account(AccountKind.USER, "alice")).id
    sql = "UPDATE accounts SET held = held + 1001 WHERE id = "
    with pytest.raises(Conflict, match="accounts_user_available_within_debt"):
        if isinstance(ledger, SqliteLedger):
            await ledger._write(lambda conn: conn.execute(sql + "?", (user_id,)))
        else:
            assert isinstance(ledger, PostgresLedger)

            async def tx(conn: Any) -> None:
                await conn.execute(sql + "$1", user_id)

            await ledger._run(tx, idempotent=False)
    assert (await ledger.get_account(AccountKind.USER, "alice")).available == 1_000
