"""Credit grants in the ledger (``Grants``), on both stores: a grant reserves like a hold, flushes
charge each call once, give back what is left, and a lapsed grant never lets a flush overdraw."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from gateway.errors import IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, HoldRequest, HoldState
from gateway.ledger.grants import GRANT_METHOD, GrantedCall, GrantRequest, GrantStatus
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger

from .conftest import FakeClock, StoreSpec

Ledger = SqliteLedger | PostgresLedger
PRICE = 1_000  # 1 cent


async def _key(ledger: Ledger, *, spend_limit: int | None = None, name: str = "k1") -> str:
    record = await ledger.create_key(
        user="alice",
        server="weather",
        key_hash="hash-" + name,
        prefix="ap_" + name,
        expires_at=None,
        spend_limit=spend_limit,
    )
    return record.id


def _req(
    key_id: str, grant_id: str = "gr_1", *, want: int = 50 * PRICE, least: int = 8 * PRICE, share: int = 4
) -> GrantRequest:
    return GrantRequest(
        grant_id=grant_id,
        key_id=key_id,
        user="alice",
        developer="acme",
        server="weather",
        want=want,
        least=least,
        share=share,
        lease_s=30.0,
        owner="proc-a",
    )


def _calls(n: int, *, start: int = 0, amount: int = PRICE, held: int = PRICE, fee: int = 0) -> list[GrantedCall]:
    return [
        GrantedCall(f"call-{i:05d}", "acme", "weather", "tools/call", "forecast", held, amount, fee)
        for i in range(start, start + n)
    ]


async def _balances(ledger: Ledger) -> tuple[int, int, int]:
    alice = await ledger.get_account(AccountKind.USER, "alice")
    acme = await ledger.get_account(AccountKind.DEVELOPER, "acme")
    return alice.balance, alice.held, acme.balance


async def _charged(ledger: Ledger, ids: Sequence[str]) -> int:
    total = 0
    for call_id in ids:
        total += (await ledger.get_charge("ch_" + call_id)).amount
    return total


async def test_a_grant_reserves_at_most_its_share_of_the_available_balance(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 100 * PRICE)
    state = await ledger.grant(_req(key, want=1_000 * PRICE))
    assert (state.status, state.granted, state.amount) == (GrantStatus.OK, 25 * PRICE, 25 * PRICE)
    assert state.available == 75 * PRICE
    assert await _balances(ledger) == (100 * PRICE, 25 * PRICE, 0)
    hold = await ledger.get_hold("gr_1")
    assert (hold.method, hold.state, hold.amount) == (GRANT_METHOD, HoldState.PENDING, 25 * PRICE)
    assert (await ledger.list_keys("alice"))[0].held == 25 * PRICE
    assert await ledger.grants_outstanding("alice") == 25 * PRICE
    assert await ledger.verify() == []


async def test_a_grant_smaller_than_the_least_asked_for_reserves_nothing(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 31 * PRICE)  # 31 // 4 = 7 calls' worth < 8
    state = await ledger.grant(_req(key))
    assert (state.status, state.granted, state.amount, state.available) == (GrantStatus.TOO_LOW, 0, 0, 31 * PRICE)
    assert await _balances(ledger) == (31 * PRICE, 0, 0)
    with pytest.raises(NotFound):
        await ledger.get_hold("gr_1")


async def test_a_grant_is_capped_by_the_keys_remaining_spend_limit(ledger: Ledger) -> None:
    key = await _key(ledger, spend_limit=40 * PRICE)
    await ledger.topup("alice", 1_000 * PRICE)
    state = await ledger.grant(_req(key, want=1_000 * PRICE))
    assert (state.granted, state.spend_remaining) == (10 * PRICE, 30 * PRICE)


async def test_topping_up_a_pending_grant_adds_to_the_same_row(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=20 * PRICE))
    state = await ledger.grant(_req(key, want=30 * PRICE))
    assert (state.status, state.granted, state.amount) == (GrantStatus.OK, 30 * PRICE, 50 * PRICE)
    assert (await ledger.get_hold("gr_1")).amount == 50 * PRICE
    assert await ledger.verify() == []


async def test_a_flush_charges_each_call_out_of_the_grant_like_a_capture(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    calls = _calls(30, fee=100)
    result = await ledger.flush_grant("gr_1", calls)
    assert (result.captured, result.replayed, result.unbilled) == (30, 0, ())
    assert (result.state.status, result.state.amount) == (GrantStatus.OK, 70 * PRICE)
    assert await _balances(ledger) == (970 * PRICE, 70 * PRICE, 30 * (PRICE - 100))
    charge = await ledger.get_charge("ch_call-00000")
    assert (charge.amount, charge.fee, charge.server, charge.method, charge.name) == (
        PRICE,
        100,
        "weather",
        "tools/call",
        "forecast",
    )
    hold = await ledger.get_hold("call-00000")
    assert (hold.state, hold.charge_id) == (HoldState.CAPTURED, "ch_call-00000")
    key_record = (await ledger.list_keys("alice"))[0]
    assert (key_record.spent, key_record.held) == (30 * PRICE, 70 * PRICE)
    assert await ledger.verify() == []


async def test_a_flush_writes_each_calls_text_and_amounts_exactly_whatever_they_contain(ledger: Ledger) -> None:
    """A flush writes its rows in one statement per table (SQLite: over a JSON array); names with
    quotes, backslashes, newlines and characters outside the BMP, two developers and mixed fees in
    one batch come back exactly as a capture would have written them."""
    await ledger.create_developer("zeta ü 😀")
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    odd = ['say "hi"\\n', "line\nbreak\ttab", "😀 émoji", "[1, 2]", "null"]
    calls = [
        GrantedCall(
            f"call-{i:05d}",
            "acme" if i % 2 else "zeta ü 😀",
            "weather",
            "tools/call",
            odd[i % len(odd)],
            PRICE,
            PRICE if i % 3 else 700,
            (i % 4) * 100,
        )
        for i in range(20)
    ]
    result = await ledger.flush_grant("gr_1", calls)
    assert result.captured == 20
    for call in calls:
        charge = await ledger.get_charge("ch_" + call.call_id)
        expected_fee = call.fee * call.amount // call.held
        assert (charge.amount, charge.fee, charge.name, charge.server, charge.method) == (
            call.amount,
            expected_fee,
            call.name,
            "weather",
            "tools/call",
        )
        hold = await ledger.get_hold(call.call_id)
        assert (hold.state, hold.charge_id, hold.developer, hold.name, hold.amount, hold.fee) == (
            HoldState.CAPTURED,
            "ch_" + call.call_id,
            call.developer,
            call.name,
            call.held,
            call.fee,
        )
    total = sum(c.amount for c in calls)
    fees = sum(c.fee * c.amount // c.held for c in calls)
    zeta = await ledger.get_account(AccountKind.DEVELOPER, "zeta ü 😀")
    acme = await ledger.get_account(AccountKind.DEVELOPER, "acme")
    assert zeta.balance + acme.balance == total - fees
    assert await ledger.verify() == []


async def test_a_retried_flush_charges_no_call_twice(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    await ledger.flush_grant("gr_1", _calls(10))
    result = await ledger.flush_grant("gr_1", _calls(15))  # the first ten again, and five new
    assert (result.captured, result.replayed) == (5, 10)
    assert result.state.amount == 85 * PRICE
    assert await _balances(ledger) == (985 * PRICE, 85 * PRICE, 15 * PRICE)
    assert await ledger.verify() == []


async def test_a_metered_call_is_charged_what_it_used_and_the_rest_stays_in_the_grant(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    result = await ledger.flush_grant("gr_1", _calls(1, amount=300, held=PRICE, fee=100))
    assert result.state.amount == 100 * PRICE - 300
    charge = await ledger.get_charge("ch_call-00000")
    assert (charge.amount, charge.fee) == (300, 30)
    assert await ledger.verify() == []


async def test_releasing_everything_left_voids_the_grant_and_frees_the_money(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    result = await ledger.flush_grant("gr_1", _calls(4), release=None)
    assert (result.state.status, result.state.amount, result.state.available) == (GrantStatus.CLOSED, 0, 996 * PRICE)
    assert (await ledger.get_hold("gr_1")).state == HoldState.VOIDED
    assert await _balances(ledger) == (996 * PRICE, 0, 4 * PRICE)
    assert await ledger.grants_outstanding("alice") == 0
    assert (await ledger.grant(_req(key))).status is GrantStatus.CLOSED  # a closed grant is never reopened
    assert await ledger.verify() == []


async def test_a_partial_release_gives_back_only_what_is_asked(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    result = await ledger.flush_grant("gr_1", [], release=60 * PRICE)
    assert (result.state.status, result.state.amount) == (GrantStatus.OK, 40 * PRICE)
    assert await _balances(ledger) == (1_000 * PRICE, 40 * PRICE, 0)
    assert await ledger.verify() == []


async def test_a_grant_spent_to_nothing_is_voided(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=10 * PRICE))
    result = await ledger.flush_grant("gr_1", _calls(10))
    assert (result.state.status, result.captured) == (GrantStatus.CLOSED, 10)
    assert (await ledger.get_hold("gr_1")).state == HoldState.VOIDED
    assert await _balances(ledger) == (990 * PRICE, 0, 10 * PRICE)
    assert await ledger.verify() == []


async def test_a_swept_grant_returns_its_money_and_a_late_flush_never_overdraws(
    ledger: Ledger, clock: FakeClock
) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 40 * PRICE)
    await ledger.grant(_req(key, want=10 * PRICE))
    clock.advance(31)
    assert await ledger.sweep() == 1
    assert await _balances(ledger) == (40 * PRICE, 0, 0)
    await ledger.hold(  # someone else takes most of the money meanwhile
        HoldRequest("other", key, "alice", "acme", "weather", "tools/call", "forecast", 37 * PRICE, 0, 30.0, "proc-b")
    )
    result = await ledger.flush_grant("gr_1", _calls(5))  # captured in memory before the lease lapsed
    assert result.captured == 3 and len(result.unbilled) == 2
    alice = await ledger.get_account(AccountKind.USER, "alice")
    assert alice.balance - alice.held == 0
    assert await ledger.verify() == []


async def test_refresh_renews_the_lease_and_reports_the_key_and_balance(ledger: Ledger, clock: FakeClock) -> None:
    key = await _key(ledger, spend_limit=500 * PRICE)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    clock.advance(20)
    states = await ledger.refresh_grants(["gr_1", "gr_unknown"], 30.0)
    assert set(states) == {"gr_1"}
    assert (states["gr_1"].status, states["gr_1"].amount, states["gr_1"].available) == (
        GrantStatus.OK,
        100 * PRICE,
        900 * PRICE,
    )
    assert states["gr_1"].spend_remaining == 400 * PRICE
    clock.advance(20)  # past the first lease, inside the renewed one
    assert await ledger.sweep() == 0
    await ledger.revoke_key(key)
    assert (await ledger.refresh_grants(["gr_1"], 30.0))["gr_1"].status is GrantStatus.REVOKED


async def test_a_revoked_key_gets_no_grant(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.revoke_key(key)
    state = await ledger.grant(_req(key))
    assert (state.status, state.granted) == (GrantStatus.REVOKED, 0)
    assert await _balances(ledger) == (1_000 * PRICE, 0, 0)


async def test_a_lowered_spend_limit_reaches_the_grant_at_its_refresh(ledger: Ledger, store: StoreSpec) -> None:
    key = await _key(ledger, spend_limit=400 * PRICE)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    await store.execute("UPDATE keys SET spend_limit = ? WHERE id = ?", 100 * PRICE, key)
    state = (await ledger.refresh_grants(["gr_1"], 30.0))["gr_1"]
    assert state.spend_remaining == 0
    assert (await ledger.grant(_req(key))).status is GrantStatus.TOO_LOW


async def test_a_charge_made_through_a_grant_can_be_refunded(ledger: Ledger) -> None:
    key = await _key(ledger)
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key, want=100 * PRICE))
    await ledger.flush_grant("gr_1", _calls(2))
    await ledger.refund("ch_call-00001")
    assert await _balances(ledger) == (999 * PRICE, 98 * PRICE, PRICE)
    assert (await ledger.list_keys("alice"))[0].spent == PRICE
    assert await ledger.verify() == []


async def test_grant_ids_and_calls_are_checked(ledger: Ledger) -> None:
    key = await _key(ledger)
    other = await _key(ledger, name="k2")
    await ledger.topup("alice", 1_000 * PRICE)
    await ledger.grant(_req(key))
    with pytest.raises(IdempotencyConflict):
        await ledger.grant(_req(other))  # the same id for another key
    with pytest.raises(InvalidInput):
        await ledger.flush_grant("gr_1", _calls(1, amount=2 * PRICE, held=PRICE))
    with pytest.raises(NotFound):
        await ledger.flush_grant("gr_missing", _calls(1))
    with pytest.raises(NotFound):
        await ledger.grant(_req("key_missing", "gr_2"))
    assert await ledger.grants_outstanding("alice", other) == 0
    assert await ledger.grants_outstanding("alice", key) == 50 * PRICE
