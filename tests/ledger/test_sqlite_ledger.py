"""Behaviour of the ledger on every store (SQLite and PostgreSQL, see conftest): top-ups, holds, captures,
voids, leases, refunds, keys, reports."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import AlreadyExists, Conflict, IdempotencyConflict, InvalidInput, NotFound, Unavailable
from gateway.ledger import open_ledger
from gateway.ledger.base import AccountKind, HoldStatus
from gateway.ledger.interfaces import Ledger
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger

from .conftest import FakeClock, HoldFactory, StoreSpec


async def balance(ledger: Ledger, kind: AccountKind, name: str = "system") -> int:
    return (await ledger.get_account(kind, name)).balance


async def count(store: StoreSpec, sql: str, *params: object) -> int:
    return int(await store.fetchval(sql, *params))


# --- top-ups ----------------------------------------------------------------------------------
async def test_topup_credits_the_user_and_debits_the_world(ledger: Ledger) -> None:
    transfer = await ledger.topup("alice", 10_000)
    assert transfer.kind == "topup" and transfer.amount == 10_000 and not transfer.replayed
    assert transfer.id.startswith("tr_")
    assert await balance(ledger, AccountKind.USER, "alice") == 10_000
    assert await balance(ledger, AccountKind.WORLD) == -10_000
    assert await ledger.verify() == []


async def test_topup_with_a_repeated_reference_is_applied_once(ledger: Ledger) -> None:
    first = await ledger.topup("alice", 5_000, reference="invoice-1")
    again = await ledger.topup("alice", 5_000, reference="invoice-1")
    assert again.replayed and again.id == first.id and not first.replayed
    assert await balance(ledger, AccountKind.USER, "alice") == 5_000


async def test_topup_reusing_a_reference_for_another_amount_or_user_is_an_idempotency_conflict(
    ledger: Ledger,
) -> None:
    await ledger.create_user("bob")
    await ledger.topup("alice", 5_000, reference="invoice-1")
    with pytest.raises(IdempotencyConflict):
        await ledger.topup("alice", 6_000, reference="invoice-1")
    with pytest.raises(IdempotencyConflict):
        await ledger.topup("bob", 5_000, reference="invoice-1")
    assert await balance(ledger, AccountKind.USER, "alice") == 5_000
    assert await balance(ledger, AccountKind.USER, "bob") == 0


async def test_topup_refuses_non_positive_amounts_and_unknown_users(ledger: Ledger) -> None:
    with pytest.raises(InvalidInput):
        await ledger.topup("alice", 0)
    with pytest.raises(InvalidInput):
        await ledger.topup("alice", -5)
    with pytest.raises(NotFound):
        await ledger.topup("nobody", 5)
    assert await balance(ledger, AccountKind.WORLD) == 0


async def test_creating_an_existing_account_is_refused(ledger: Ledger) -> None:
    with pytest.raises(AlreadyExists):
        await ledger.create_user("alice")
    with pytest.raises(AlreadyExists):
        await ledger.create_developer("acme")
    assert await ledger.developer_names() == {"acme"}
    with pytest.raises(NotFound):
        await ledger.get_account(AccountKind.USER, "nobody")


# --- holds and captures -----------------------------------------------------------------------
async def test_capture_moves_exactly_the_amount_from_user_to_developer_and_fee_to_platform(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 10_000)
    outcome = await ledger.hold(hold_req("call-1", amount=3_000, fee=300))
    assert outcome.status is HoldStatus.OK and outcome.available == 7_000
    held = await ledger.get_account(AccountKind.USER, "alice")
    assert (held.balance, held.held, held.available) == (10_000, 3_000, 7_000)

    charge = await ledger.capture("call-1")
    assert charge.id == "ch_call-1"
    assert (charge.amount, charge.fee, charge.refunded, charge.balance_after) == (3_000, 300, 0, 7_000)
    assert (charge.user, charge.developer, charge.server, charge.name) == ("alice", "acme", "weather", "forecast")
    after = await ledger.get_account(AccountKind.USER, "alice")
    assert (after.balance, after.held) == (7_000, 0)
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 2_700
    assert await balance(ledger, AccountKind.PLATFORM_FEE) == 300
    assert await ledger.get_charge(charge.id) == charge
    assert await ledger.verify() == []


async def test_capture_twice_returns_the_same_charge_and_posts_one_transfer(
    ledger: Ledger, hold_req: HoldFactory, store: StoreSpec
) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("call-1", amount=3_000))
    first = await ledger.capture("call-1")
    second = await ledger.capture("call-1")
    assert second == first
    assert await count(store, "SELECT COUNT(*) FROM transfers WHERE kind = 'charge'") == 1
    assert await balance(ledger, AccountKind.USER, "alice") == 7_000


async def test_concurrent_captures_of_one_hold_charge_once(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("call-1", amount=3_000))
    charges = await asyncio.gather(*(ledger.capture("call-1") for _ in range(20)))
    assert len({c.id for c in charges}) == 1
    assert await balance(ledger, AccountKind.USER, "alice") == 7_000


async def test_void_releases_the_hold(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=1_000))
    assert (await ledger.get_account(AccountKind.USER, "alice")).available == 0
    assert await ledger.void("call-1") is True
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (1_000, 0)
    assert await ledger.void("call-1") is False
    assert await ledger.verify() == []


async def test_capture_after_void_is_a_conflict(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=500))
    await ledger.void("call-1")
    with pytest.raises(Conflict):
        await ledger.capture("call-1")
    assert await balance(ledger, AccountKind.USER, "alice") == 1_000


async def test_void_after_capture_changes_nothing(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=500))
    await ledger.capture("call-1")
    assert await ledger.void("call-1") is False
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (500, 0)


async def test_partial_capture_charges_part_scales_the_fee_and_releases_the_rest(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("call-1", amount=4_000, fee=1_000))
    charge = await ledger.capture("call-1", amount=1_000)
    assert (charge.amount, charge.fee) == (1_000, 250)
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (9_000, 0)
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 750
    assert await balance(ledger, AccountKind.PLATFORM_FEE) == 250
    assert await ledger.verify() == []


async def test_capture_of_more_than_held_is_invalid_and_of_an_unknown_call_not_found(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("call-1", amount=1_000))
    with pytest.raises(InvalidInput):
        await ledger.capture("call-1", amount=1_001)
    with pytest.raises(NotFound):
        await ledger.capture("no-such-call")
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 1_000


async def test_hold_refuses_when_available_balance_is_short(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=700))
    refused = await ledger.hold(hold_req("call-2", amount=400))
    assert refused.status is HoldStatus.INSUFFICIENT_FUNDS and not refused.ok
    assert refused.available == 300
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 700
    # a refused hold leaves nothing behind: capturing it finds no hold
    with pytest.raises(NotFound):
        await ledger.capture("call-2")
    assert await ledger.void("call-2") is False


async def test_hold_replayed_with_the_same_call_id_reserves_nothing(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=600))
    replay = await ledger.hold(hold_req("call-1", amount=600))
    assert replay.status is HoldStatus.REPLAYED and replay.ok and replay.available == 400
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 600


async def test_hold_refuses_bad_amounts_and_unknown_parties(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 1_000)
    with pytest.raises(InvalidInput):
        await ledger.hold(hold_req("call-1", amount=0))
    with pytest.raises(InvalidInput):
        await ledger.hold(hold_req("call-1", amount=100, fee=101))
    with pytest.raises(NotFound):
        await ledger.hold(hold_req("call-1", amount=100, user="nobody"))
    with pytest.raises(NotFound):
        await ledger.hold(hold_req("call-1", amount=100, developer="nobody"))
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 0


async def test_spend_limit_is_enforced_by_hold(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 100_000)
    key = await ledger.create_key(
        user="alice", server="weather", key_hash="h1", prefix="ap_abc", expires_at=None, spend_limit=1_000
    )
    first = await ledger.hold(hold_req("call-1", amount=600, key_id=key.id))
    assert first.status is HoldStatus.OK and first.spend_remaining == 400
    refused = await ledger.hold(hold_req("call-2", amount=600, key_id=key.id))
    assert refused.status is HoldStatus.SPEND_LIMIT and refused.spend_remaining == 400
    assert refused.available == 100_000 - 600
    await ledger.capture("call-1", amount=500)  # spent 500, nothing held
    record = await ledger.find_key("h1")
    assert record is not None and (record.spent, record.held) == (500, 0)
    assert (await ledger.hold(hold_req("call-3", amount=500, key_id=key.id))).status is HoldStatus.OK
    assert (await ledger.hold(hold_req("call-4", amount=1, key_id=key.id))).status is HoldStatus.SPEND_LIMIT
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 500
    assert await ledger.verify() == []


async def test_concurrent_holds_never_exceed_the_spend_limit(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 100_000)
    key = await ledger.create_key(
        user="alice", server="weather", key_hash="h1", prefix="ap_abc", expires_at=None, spend_limit=100
    )
    outcomes = await asyncio.gather(*(ledger.hold(hold_req(f"c{i}", amount=7, key_id=key.id)) for i in range(50)))
    assert sum(o.status is HoldStatus.OK for o in outcomes) == 14
    assert sum(o.status is HoldStatus.SPEND_LIMIT for o in outcomes) == 36


# --- leases -----------------------------------------------------------------------------------
async def test_sweep_voids_only_lapsed_leases_and_renewed_ones_stay(
    ledger: Ledger, hold_req: HoldFactory, clock: FakeClock
) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("lapses", amount=1_000, lease_s=30))
    await ledger.hold(hold_req("renewed", amount=2_000, lease_s=30))
    await ledger.hold(hold_req("long", amount=3_000, lease_s=300))
    clock.advance(20)
    await ledger.renew(["renewed"], 30)  # now expires at t0 + 50
    clock.advance(20)  # t0 + 40: only "lapses" (t0 + 30) is past its lease
    assert await ledger.sweep() == 1
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 5_000
    with pytest.raises(Conflict):
        await ledger.capture("lapses")
    assert (await ledger.capture("renewed")).amount == 2_000
    assert await ledger.sweep(now=clock.now + 1_000) == 1  # "long"
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (8_000, 0)
    assert await ledger.verify() == []


async def test_a_lease_lapses_only_after_its_expiry_time(
    ledger: Ledger, hold_req: HoldFactory, clock: FakeClock
) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=100, lease_s=30))
    assert await ledger.sweep(now=clock.now + 30) == 0
    assert await ledger.sweep(now=clock.now + 30.001) == 1


async def test_sweep_releases_key_holds(ledger: Ledger, hold_req: HoldFactory, clock: FakeClock) -> None:
    await ledger.topup("alice", 10_000)
    key = await ledger.create_key(
        user="alice", server="weather", key_hash="h1", prefix="ap_abc", expires_at=None, spend_limit=None
    )
    await ledger.hold(hold_req("a", amount=100, key_id=key.id, lease_s=1))
    await ledger.hold(hold_req("b", amount=200, key_id=key.id, lease_s=1))
    clock.advance(2)
    assert await ledger.sweep() == 2
    record = await ledger.find_key("h1")
    assert record is not None and record.held == 0
    assert await ledger.verify() == []


# --- verify -----------------------------------------------------------------------------------
async def test_verify_detects_a_balance_that_does_not_match_its_postings(ledger: Ledger, store: StoreSpec) -> None:
    await ledger.topup("alice", 1_000)
    assert await ledger.verify() == []
    await store.execute("UPDATE accounts SET balance = balance + 1 WHERE kind = 'user' AND name = 'alice'")
    problems = await ledger.verify()
    assert any("'alice'" in p and "balance 1001" in p for p in problems), problems


async def test_verify_detects_held_that_does_not_match_pending_holds(
    ledger: Ledger, hold_req: HoldFactory, store: StoreSpec
) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=100))
    await store.execute("UPDATE accounts SET held = held + 5 WHERE kind = 'user'")
    problems = await ledger.verify()
    assert any("held 105" in p for p in problems), problems


async def test_verify_detects_a_captured_hold_without_its_charge(
    ledger: Ledger, hold_req: HoldFactory, store: StoreSpec
) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.hold(hold_req("call-1", amount=100))
    await ledger.capture("call-1")
    await store.execute("DELETE FROM charges")  # nothing references charges (a raw connection checks no FKs)
    problems = await ledger.verify()
    assert any("captured hold call-1" in p for p in problems), problems


# --- refunds ----------------------------------------------------------------------------------
async def _charged(ledger: Ledger, hold_req: HoldFactory, amount: int = 1_000, fee: int = 100) -> str:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("call-1", amount=amount, fee=fee))
    return (await ledger.capture("call-1")).id


async def test_full_refund_reverses_the_charge(ledger: Ledger, hold_req: HoldFactory) -> None:
    charge_id = await _charged(ledger, hold_req)
    refund = await ledger.refund(charge_id)
    assert (refund.kind, refund.amount) == ("refund", 1_000)
    assert await balance(ledger, AccountKind.USER, "alice") == 10_000
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 0
    assert await balance(ledger, AccountKind.PLATFORM_FEE) == 0
    assert (await ledger.get_charge(charge_id)).refunded == 1_000
    with pytest.raises(Conflict):
        await ledger.refund(charge_id)
    assert await ledger.verify() == []


async def test_partial_refunds_add_up_to_the_charge_and_the_fee_exactly(ledger: Ledger, hold_req: HoldFactory) -> None:
    charge_id = await _charged(ledger, hold_req, amount=1_000, fee=333)
    for _ in range(3):
        await ledger.refund(charge_id, 333)
    assert await balance(ledger, AccountKind.USER, "alice") == 9_999
    await ledger.refund(charge_id, 1)
    assert await balance(ledger, AccountKind.USER, "alice") == 10_000
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 0
    assert await balance(ledger, AccountKind.PLATFORM_FEE) == 0
    assert await ledger.verify() == []


async def test_refund_cannot_exceed_the_charge(ledger: Ledger, hold_req: HoldFactory) -> None:
    charge_id = await _charged(ledger, hold_req)
    await ledger.refund(charge_id, 600)
    with pytest.raises(Conflict, match=r"only 0\.4 of its 1 cents remain"):
        await ledger.refund(charge_id, 401)
    assert (await ledger.get_charge(charge_id)).refunded == 600
    assert await balance(ledger, AccountKind.USER, "alice") == 9_600


async def test_concurrent_refunds_never_exceed_the_charge(ledger: Ledger, hold_req: HoldFactory) -> None:
    charge_id = await _charged(ledger, hold_req)
    results = await asyncio.gather(*(ledger.refund(charge_id, 300) for _ in range(10)), return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
    assert (await ledger.get_charge(charge_id)).refunded == 900
    assert await balance(ledger, AccountKind.USER, "alice") == 9_900
    assert await ledger.verify() == []


async def test_refund_with_a_repeated_reference_is_applied_once(ledger: Ledger, hold_req: HoldFactory) -> None:
    charge_id = await _charged(ledger, hold_req)
    first = await ledger.refund(charge_id, 200, reference="ticket-7")
    again = await ledger.refund(charge_id, 200, reference="ticket-7")
    assert again.replayed and again.id == first.id
    with pytest.raises(IdempotencyConflict):
        await ledger.refund(charge_id, 300, reference="ticket-7")
    assert (await ledger.get_charge(charge_id)).refunded == 200


async def test_refund_reduces_the_key_spend(ledger: Ledger, hold_req: HoldFactory) -> None:
    await ledger.topup("alice", 10_000)
    key = await ledger.create_key(
        user="alice", server="weather", key_hash="h1", prefix="ap_abc", expires_at=None, spend_limit=1_000
    )
    await ledger.hold(hold_req("call-1", amount=1_000, key_id=key.id))
    charge = await ledger.capture("call-1")
    assert (await ledger.hold(hold_req("call-2", amount=1, key_id=key.id))).status is HoldStatus.SPEND_LIMIT
    await ledger.refund(charge.id, 400)
    record = await ledger.find_key("h1")
    assert record is not None and record.spent == 600
    assert (await ledger.hold(hold_req("call-3", amount=400, key_id=key.id))).status is HoldStatus.OK
    assert await ledger.verify() == []


async def test_refund_is_refused_when_the_developer_earnings_were_paid_out(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    charge_id = await _charged(ledger, hold_req, amount=1_000, fee=0)
    await ledger.create_payout("acme")  # the developer's 1,000 leave for payout clearing
    assert await ledger.verify() == []
    with pytest.raises(Conflict, match="developer account 'acme'"):
        await ledger.refund(charge_id, 500)
    assert (await ledger.get_charge(charge_id)).refunded == 0
    assert await balance(ledger, AccountKind.USER, "alice") == 9_000
    assert await ledger.verify() == []


async def test_refund_of_an_unknown_charge_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.refund("ch_nope")
    with pytest.raises(NotFound):
        await ledger.get_charge("ch_nope")


# --- keys -------------------------------------------------------------------------------------
async def _key(ledger: Ledger, key_hash: str, prefix: str, user: str = "alice") -> str:
    record = await ledger.create_key(
        user=user, server="weather", key_hash=key_hash, prefix=prefix, expires_at=None, spend_limit=None
    )
    return record.id


async def test_created_keys_are_found_by_hash_and_listed_by_user(ledger: Ledger) -> None:
    await ledger.create_user("bob")
    alice_key = await _key(ledger, "h1", "ap_aaaa1111")
    await _key(ledger, "h2", "ap_bbbb2222", user="bob")
    assert alice_key.startswith("key_") and len(alice_key) == len("key_") + 12
    found = await ledger.find_key("h1")
    assert found is not None and (found.id, found.user, found.prefix) == (alice_key, "alice", "ap_aaaa1111")
    assert await ledger.find_key("unknown") is None
    assert [k.id for k in await ledger.list_keys("alice")] == [alice_key]
    assert len(await ledger.list_keys()) == 2
    with pytest.raises(AlreadyExists):
        await _key(ledger, "h1", "ap_other")
    with pytest.raises(NotFound):
        await ledger.list_keys("nobody")


async def test_key_is_revoked_by_id(ledger: Ledger, clock: FakeClock) -> None:
    key_id = await _key(ledger, "h1", "ap_aaaa1111")
    revoked = await ledger.revoke_key(key_id)
    assert revoked.id == key_id and revoked.revoked_at == clock.now
    found = await ledger.find_key("h1")
    assert found is not None and found.revoked_at == clock.now


async def test_key_is_revoked_by_a_unique_prefix(ledger: Ledger) -> None:
    key_id = await _key(ledger, "h1", "ap_aaaa1111")
    other = await _key(ledger, "h2", "ap_bbbb2222")
    assert (await ledger.revoke_key("ap_aaa")).id == key_id
    other_record = await ledger.find_key("h2")
    assert other_record is not None and other_record.id == other and other_record.revoked_at is None


async def test_an_ambiguous_prefix_revokes_nothing(ledger: Ledger) -> None:
    await _key(ledger, "h1", "ap_aaaa1111")
    await _key(ledger, "h2", "ap_aaaa2222")
    with pytest.raises(InvalidInput, match="matches 2 keys"):
        await ledger.revoke_key("ap_aaaa")
    with pytest.raises(NotFound):
        await ledger.revoke_key("ap_zzz")
    assert all(k.revoked_at is None for k in await ledger.list_keys())


async def test_revoked_since_lists_keys_revoked_at_or_after_a_time(ledger: Ledger, clock: FakeClock) -> None:
    early = await _key(ledger, "h1", "ap_aaaa1111")
    late = await _key(ledger, "h2", "ap_bbbb2222")
    await _key(ledger, "h3", "ap_cccc3333")
    await ledger.revoke_key(early)
    clock.advance(10)
    checkpoint = clock.now
    await ledger.revoke_key(late)
    assert await ledger.revoked_since(checkpoint) == [late]
    assert await ledger.revoked_since(0) == [early, late]
    again = await ledger.revoke_key(early)  # revoking twice keeps the first time
    assert again.revoked_at == checkpoint - 10


# --- reports ----------------------------------------------------------------------------------
async def test_user_summary_lists_recent_charges_newest_first(
    ledger: Ledger, hold_req: HoldFactory, clock: FakeClock
) -> None:
    await ledger.topup("alice", 10_000)
    await _key(ledger, "h1", "ap_aaaa1111")
    for i in range(3):
        clock.advance(1)
        await ledger.hold(hold_req(f"call-{i}", amount=100 * (i + 1)))
        await ledger.capture(f"call-{i}")
    await ledger.hold(hold_req("pending", amount=50))
    summary = await ledger.user_summary("alice", recent=2)
    assert (summary.balance, summary.held, summary.available) == (9_400, 50, 9_350)
    assert [c.call_id for c in summary.recent_charges] == ["call-2", "call-1"]
    assert len(summary.keys) == 1


async def test_usage_groups_captured_calls_by_user_server_method_and_name(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("a", amount=100, name="forecast"))
    await ledger.hold(hold_req("b", amount=300, name="forecast"))
    await ledger.hold(hold_req("c", amount=50, name="alerts"))
    await ledger.hold(hold_req("d", amount=70, name="alerts", server="maps"))
    await ledger.hold(hold_req("voided", amount=999, name="alerts"))
    for call_id in ("a", "c", "d"):
        await ledger.capture(call_id)
    await ledger.capture("b", amount=200)
    await ledger.void("voided")
    rows = await ledger.usage()
    assert [(r.server, r.name, r.calls, r.amount) for r in rows] == [
        ("maps", "alerts", 1, 70),
        ("weather", "alerts", 1, 50),
        ("weather", "forecast", 2, 300),
    ]
    assert [r.amount for r in await ledger.usage(server="weather")] == [50, 300]
    assert await ledger.usage(user="nobody") == []


async def test_earnings_are_the_developer_balance_and_lifetime_is_net_of_refunds(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 10_000)
    await ledger.hold(hold_req("a", amount=1_000, fee=100))
    await ledger.hold(hold_req("b", amount=2_000, fee=200))
    await ledger.capture("a")
    charge = await ledger.capture("b")
    await ledger.refund(charge.id, 1_000)
    earnings = await ledger.earnings("acme")
    assert earnings.earnings == 900 + 1_800 - 900
    assert earnings.lifetime == 900 + 1_800 - 900
    with pytest.raises(NotFound):
        await ledger.earnings("nobody")


# --- schema and factory -----------------------------------------------------------------------
async def test_reopening_a_database_keeps_data_and_applies_migrations_once(store: StoreSpec, clock: FakeClock) -> None:
    async with store.open(clock) as first:
        await first.create_user("alice")
        await first.topup("alice", 1_000)
    async with store.open(clock) as second:
        assert await balance(second, AccountKind.USER, "alice") == 1_000
        assert await second.verify() == []
    assert await count(store, "SELECT COUNT(*) FROM schema_migrations") >= 1
    assert await count(store, "SELECT COUNT(*) FROM accounts WHERE name = 'system'") == 3
    if store.kind == "sqlite":
        with sqlite3.connect(store.location) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_two_ledgers_on_one_file_see_each_others_writes(store: StoreSpec, hold_req: HoldFactory) -> None:
    async with store.open() as a, store.open() as b:
        await a.create_user("alice")
        await a.create_developer("acme")
        await b.topup("alice", 500)
        assert (await a.hold(hold_req("x", amount=500))).ok
        assert (await b.hold(hold_req("y", amount=1))).status is HoldStatus.INSUFFICIENT_FUNDS
        assert (await b.capture("x")).amount == 500


async def test_closed_ledger_refuses_work(store: StoreSpec) -> None:
    closed = store.open()
    await closed.open()
    await closed.close()
    await closed.close()  # idempotent
    with pytest.raises(Unavailable, match="not open"):
        await closed.verify()


def test_open_ledger_maps_sqlite_and_postgres_urls(tmp_path: Path) -> None:
    store = open_ledger(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(store, SqliteLedger) and store.path == tmp_path / "x.db"
    relative = open_ledger("sqlite:///data/agentpay.db")
    assert isinstance(relative, SqliteLedger) and str(relative.path) == "data/agentpay.db"
    for url in ("postgresql://localhost/agentpay", "postgres://u@db:5433/agentpay"):
        postgres = open_ledger(url)
        assert isinstance(postgres, PostgresLedger) and postgres.dsn == url
    with pytest.raises(InvalidInput):
        open_ledger("mysql://localhost/agentpay")
    assert not (tmp_path / "x.db").exists()  # nothing happens before open()
