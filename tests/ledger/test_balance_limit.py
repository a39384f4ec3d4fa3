"""The ledger's balance limit (``base.MAX_BALANCE``, ``base.MAX_AMOUNT``) on every store: a request
that would take a balance out of range is refused (422) and changes nothing, and the database itself
refuses such a balance when the stores' own checks are bypassed.

Ten top-ups of 10^15 cents once pushed a SQLite balance past the 64-bit range: SQLite stored a REAL,
after which ``ledger verify`` and ``users show`` crashed and the world account lost precision.
"""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest

from gateway.errors import AmountTooLarge, BalanceLimitExceeded
from gateway.ledger import rows as store_rows
from gateway.ledger.base import MAX_AMOUNT, MAX_BALANCE, AccountKind
from gateway.ledger.interfaces import Ledger
from gateway.ledger.postgres import store as postgres_store
from gateway.ledger.sqlite import common as sqlite_store

from .conftest import StoreSpec


async def balances(ledger: Ledger) -> dict[str, int]:
    return {
        "alice": (await ledger.get_account(AccountKind.USER, "alice")).balance,
        "bob": (await ledger.get_account(AccountKind.USER, "bob")).balance,
        "world": (await ledger.get_account(AccountKind.WORLD, "system")).balance,
    }


async def test_a_top_up_past_the_maximum_balance_is_refused_with_422_and_changes_nothing(ledger: Ledger) -> None:
    await ledger.create_user("bob")
    await ledger.topup("alice", MAX_BALANCE - 5)
    before = await balances(ledger)

    with pytest.raises(BalanceLimitExceeded) as past_alice:
        await ledger.topup("alice", 6)  # alice past the maximum, the world below its negative
    with pytest.raises(BalanceLimitExceeded) as past_world:
        await ledger.topup("bob", 6)  # bob is far from it, but the ledger as a whole would hold too much
    with pytest.raises(AmountTooLarge) as too_large:
        await ledger.topup("bob", MAX_AMOUNT + 1)  # one request over the per-request bound
    for refused in (past_alice.value, past_world.value, too_large.value):
        assert refused.http_status == 422 and refused.hint.startswith("Nothing was changed")
    assert "world account" in past_world.value.message and "1000000000000 cents" in past_world.value.message
    assert await balances(ledger) == before

    await ledger.topup("bob", 5)  # exactly to the limit is fine
    assert await balances(ledger) == {"alice": MAX_BALANCE - 5, "bob": 5, "world": -MAX_BALANCE}
    assert await ledger.verify() == []
    summary = await ledger.user_summary("alice")
    assert isinstance(summary.balance, int) and summary.available == MAX_BALANCE - 5


async def test_the_database_refuses_a_balance_past_the_maximum_even_when_the_ledgers_checks_are_bypassed(
    ledger: Ledger, store: StoreSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    await ledger.create_user("bob")
    await ledger.topup("alice", MAX_BALANCE)
    before = await balances(ledger)

    # the stores' own checks widened far past the limit: only the database is left to refuse
    for module in (sqlite_store, postgres_store, store_rows):
        monkeypatch.setattr(module, "MAX_BALANCE", 2**62)
    with pytest.raises(BalanceLimitExceeded, match="Refused by the ledger database"):
        await ledger.topup("alice", 1)
    with pytest.raises(BalanceLimitExceeded, match="Refused by the ledger database"):
        await ledger.topup("bob", 1)
    assert await balances(ledger) == before
    assert await ledger.verify() == []

    # raw writes, no ledger code at all (as from an sqlite3 shell or psql)
    refused = (sqlite3.IntegrityError, asyncpg.CheckViolationError)
    acme = "kind = 'developer' AND name = 'acme'"
    for sql, value in (
        ("UPDATE accounts SET balance = ? WHERE kind = 'user' AND name = 'bob'", MAX_BALANCE + 1),
        ("UPDATE accounts SET balance = ? WHERE kind = 'world'", -MAX_BALANCE - 1),
        (f"UPDATE accounts SET balance = balance + ? WHERE {acme}", 2**63 - 1),
        ("INSERT INTO accounts (kind, name, balance, created_at) VALUES ('developer', 'rich', ?, 0)", MAX_BALANCE + 1),
    ):
        with pytest.raises(refused, match="accounts_balance_within_limit"):
            await store.execute(sql, value)
    # an addition past 64 bits: SQLite would make it a REAL (the float balance of the finding), PostgreSQL an error
    with pytest.raises((*refused, asyncpg.NumericValueOutOfRangeError)):
        await store.execute("UPDATE accounts SET balance = balance + ? WHERE kind = 'user'", 2**63 - 1)
    # the limit itself is allowed
    await store.execute(f"UPDATE accounts SET balance = ? WHERE {acme}", MAX_BALANCE)
    assert await store.fetchval(f"SELECT balance FROM accounts WHERE {acme}") == MAX_BALANCE
    await store.execute(f"UPDATE accounts SET balance = 0 WHERE {acme}")
    assert await balances(ledger) == before
    assert await ledger.verify() == []
