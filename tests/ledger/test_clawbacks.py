"""Clawbacks (``interfaces.Clawbacks``): money a payment provider took back from a user (a refund of a
card top-up, a lost dispute) leaves the ledger even when the user already spent it. The balance goes
negative, every new hold is refused until a top-up covers the debt, holds taken before still capture,
and ``ledger verify`` stays clean, on both stores."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg
import pytest

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput
from gateway.ledger.base import AccountKind, HoldStatus
from gateway.ledger.interfaces import Ledger

from .conftest import HoldFactory, StoreSpec


async def available(ledger: Ledger, user: str = "alice") -> int:
    return (await ledger.get_account(AccountKind.USER, user)).available


async def test_a_clawback_of_spent_money_leaves_a_negative_balance_and_verify_stays_clean(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 1_000, reference="stripe:checkout:cs_1")
    assert (await ledger.hold(hold_req("c1", amount=800))).ok
    await ledger.capture("c1")

    taken = await ledger.clawback("alice", 1_000, "stripe:dispute:dp_1:withdrawn")

    assert taken.kind == "clawback" and not taken.replayed
    assert await available(ledger) == -800
    world = await ledger.get_account(AccountKind.WORLD, "system")
    assert world.balance == 0  # the 1,000 that entered left again
    assert await ledger.verify() == []


async def test_a_repeated_clawback_reference_is_applied_once_and_a_changed_one_conflicts(ledger: Ledger) -> None:
    await ledger.topup("alice", 500)
    first = await ledger.clawback("alice", 300, "stripe:refund:re_1")
    again = await ledger.clawback("alice", 300, "stripe:refund:re_1")

    assert again.replayed and again.id == first.id
    assert await available(ledger) == 200
    with pytest.raises(IdempotencyConflict):
        await ledger.clawback("alice", 301, "stripe:refund:re_1")
    with pytest.raises(InvalidInput):
        await ledger.clawback("alice", 1, " ")
    assert await ledger.verify() == []


async def test_a_user_in_debt_is_refused_every_hold_until_a_top_up_covers_the_debt(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.clawback("alice", 700, "stripe:dispute:dp_2:withdrawn")

    refused = await ledger.hold(hold_req("c1", amount=1))
    assert refused.status == HoldStatus.INSUFFICIENT_FUNDS and refused.available == -700

    await ledger.topup("alice", 500)  # a credit to a user in debt is accepted
    assert await available(ledger) == -200
    assert not (await ledger.hold(hold_req("c2", amount=1))).ok

    await ledger.topup("alice", 700, reference="stripe:dispute:dp_2:reinstated")
    assert await available(ledger) == 500
    assert (await ledger.hold(hold_req("c3", amount=500))).ok
    assert await ledger.verify() == []


async def test_holds_taken_before_a_clawback_still_capture_and_void(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    assert (await ledger.hold(hold_req("c1", amount=400, fee=40))).ok
    assert (await ledger.hold(hold_req("c2", amount=300))).ok

    await ledger.clawback("alice", 1_000, "stripe:refund:re_9")
    assert await available(ledger) == -700  # balance 0, 700 held

    charge = await ledger.capture("c1")
    assert charge.amount == 400
    assert await ledger.void("c2")
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (-400, 0)
    assert (await ledger.earnings("acme")).earnings == 360
    assert await ledger.verify() == []


async def test_a_charge_refund_credits_a_user_in_debt(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    assert (await ledger.hold(hold_req("c1", amount=600))).ok
    charge = await ledger.capture("c1")
    await ledger.clawback("alice", 1_000, "stripe:refund:re_2")
    assert await available(ledger) == -600

    await ledger.refund(charge.id, 600)

    assert await available(ledger) == 0
    assert await ledger.verify() == []


async def test_the_database_still_refuses_a_negative_developer_balance_after_the_clawback_migration(
    ledger: Ledger, store: StoreSpec
) -> None:
    assert "0008_clawbacks" in await ledger.applied_migrations()
    developer_id = (await ledger.get_account(AccountKind.DEVELOPER, "acme")).id
    errors = (sqlite3.IntegrityError, asyncpg.CheckViolationError)
    with pytest.raises(errors):
        await store.execute("UPDATE accounts SET balance = -1 WHERE id = ?", developer_id)
    with pytest.raises(errors):
        await store.execute(
            "INSERT INTO transfers (id, kind, amount, created_at) VALUES ('tr_x', 'gift', 1, 0)",
        )
    # a second connection (another process) sees the loosened user constraint, bounded by the debt
    # column of 0010 (tests/ledger/test_debt_guard.py)
    user_id = (await ledger.get_account(AccountKind.USER, "alice")).id
    await store.execute("UPDATE accounts SET held = 5, debt = 5 WHERE id = ?", user_id)
    assert await store.fetchval("SELECT balance - held FROM accounts WHERE id = ?", user_id) == -5


async def test_verify_reports_a_negative_available_that_no_clawback_explains(ledger: Ledger, store: StoreSpec) -> None:
    user_id = (await ledger.get_account(AccountKind.USER, "alice")).id
    await store.execute("UPDATE accounts SET held = 5, debt = 5 WHERE id = ?", user_id)  # past the 0010 guard

    problems = await ledger.verify()

    assert any("negative available beyond its clawbacks" in p for p in problems), problems


async def test_a_reversed_payout_returns_its_money_to_the_developer_once(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    assert (await ledger.hold(hold_req("c1", amount=1_000))).ok
    await ledger.capture("c1")
    payout = await ledger.create_payout("acme")
    with pytest.raises(Conflict):
        await ledger.reverse_payout(payout.id)  # pending: fail_payout returns it instead
    await ledger.settle_payout(payout.id, "tr_stripe_1")
    assert (await ledger.earnings("acme")).earnings == 0

    first = await ledger.reverse_payout(payout.id)
    again = await ledger.reverse_payout(payout.id)

    assert first.kind == "payout_reversal" and again.replayed and again.id == first.id
    assert (await ledger.earnings("acme")).earnings == 1_000
    assert await ledger.verify() == []


async def test_a_ledger_with_clawbacks_and_reversals_moves_between_stores_and_verifies(
    ledger: Ledger, hold_req: HoldFactory, tmp_path: Path, store: StoreSpec
) -> None:
    await ledger.topup("alice", 1_000)
    assert (await ledger.hold(hold_req("c1", amount=900))).ok
    await ledger.capture("c1")
    await ledger.clawback("alice", 1_000, "stripe:dispute:dp_9:withdrawn")
    payout = await ledger.create_payout("acme")
    await ledger.settle_payout(payout.id, "tr_1")
    await ledger.reverse_payout(payout.id)
    exported = await ledger.export_rows()

    other = "postgres" if store.kind == "sqlite" else "sqlite"
    target_spec = StoreSpec.fresh(other, tmp_path, "target")
    target = target_spec.open()
    await target.open()
    try:
        await target.import_rows(exported)
        assert await target.verify() == []
        assert (await target.get_account(AccountKind.USER, "alice")).available == -900
        assert await target.export_rows() == exported
    finally:
        await target.close()
        await target_spec.drop()
