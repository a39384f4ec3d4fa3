"""The ledger behind the service API: one-step charges, idempotency by call id and refund reference,
charge listings, service tokens, payouts, statements and earnings breakdowns.

Written against the ``Ledger`` interface only (fixtures ``ledger``, ``clock``, ``hold_req``), so
the same tests run on every store.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Protocol

import pytest

from gateway.errors import AlreadyExists, Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import (
    AccountKind,
    EarningsBreakdown,
    HoldRequest,
    HoldState,
    HoldStatus,
    Payout,
    PayoutState,
    developer_reference,
    operator_reference,
)
from gateway.ledger.interfaces import Ledger

from .conftest import FakeClock, StoreSpec

MakeHold = Callable[..., HoldRequest]


class Clock(Protocol):
    def advance(self, seconds: float) -> None: ...

    def __call__(self) -> float: ...


async def balance(ledger: Ledger, kind: AccountKind, name: str = "system") -> int:
    return (await ledger.get_account(kind, name)).balance


async def balances(ledger: Ledger) -> dict[str, int]:
    """Every account the tests touch, for 'nothing changed' assertions."""
    return {
        "alice": await balance(ledger, AccountKind.USER, "alice"),
        "acme": await balance(ledger, AccountKind.DEVELOPER, "acme"),
        "fee": await balance(ledger, AccountKind.PLATFORM_FEE),
        "clearing": await balance(ledger, AccountKind.PAYOUT_CLEARING),
        "world": await balance(ledger, AccountKind.WORLD),
    }


async def charged(ledger: Ledger, hold_req: MakeHold, call_id: str, amount: int, **fields: object) -> str:
    result = await ledger.charge(hold_req(call_id, amount=amount, **fields))
    assert result.status is HoldStatus.OK and result.charge is not None
    return result.charge.id


# --- one-step charge --------------------------------------------------------------------------
async def test_one_step_charge_moves_exactly_the_amount_and_a_repeated_call_id_replays_it(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.topup("alice", 10_000)
    first = await ledger.charge(hold_req("call-1", amount=1_000, fee=100))
    assert first.status is HoldStatus.OK and first.ok and first.charge is not None
    charge = first.charge
    assert (charge.amount, charge.fee, charge.refunded, charge.balance_after) == (1_000, 100, 0, 9_000)
    assert (charge.call_id, charge.user, charge.developer, charge.server, charge.name) == (
        "call-1",
        "alice",
        "acme",
        "weather",
        "forecast",
    )
    assert first.available == 9_000
    expected = {"alice": 9_000, "acme": 900, "fee": 100, "clearing": 0, "world": -10_000}
    assert await balances(ledger) == expected

    again = await ledger.charge(hold_req("call-1", amount=1_000, fee=100))
    assert again.status is HoldStatus.REPLAYED and again.ok
    assert again.charge == charge
    assert again.available == 9_000
    assert await balances(ledger) == expected
    assert [c.id for c in await ledger.list_charges(user="alice")] == [charge.id]
    hold = await ledger.get_hold("call-1")
    assert (hold.state, hold.charge_id, hold.amount, hold.fee) == (HoldState.CAPTURED, charge.id, 1_000, 100)
    assert await ledger.verify() == []


async def test_charge_replayed_with_a_different_amount_name_or_user_is_an_idempotency_conflict(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.create_user("bob")
    await ledger.topup("alice", 10_000)
    await ledger.topup("bob", 10_000)
    await charged(ledger, hold_req, "call-1", 1_000)
    before = await balances(ledger)
    with pytest.raises(IdempotencyConflict):
        await ledger.charge(hold_req("call-1", amount=2_000))
    with pytest.raises(IdempotencyConflict):
        await ledger.charge(hold_req("call-1", amount=1_000, name="other-tool"))
    with pytest.raises(IdempotencyConflict):
        await ledger.charge(hold_req("call-1", amount=1_000, server="maps"))
    with pytest.raises(IdempotencyConflict):
        await ledger.charge(hold_req("call-1", amount=1_000, user="bob"))
    assert await balances(ledger) == before
    assert await balance(ledger, AccountKind.USER, "bob") == 10_000
    assert len(await ledger.list_charges()) == 1
    assert await ledger.verify() == []


async def test_charge_refuses_on_insufficient_funds_and_writes_nothing(ledger: Ledger, hold_req: MakeHold) -> None:
    await ledger.topup("alice", 500)
    before = await balances(ledger)
    result = await ledger.charge(hold_req("call-1", amount=600))
    assert result.status is HoldStatus.INSUFFICIENT_FUNDS
    assert not result.ok and result.charge is None
    assert result.available == 500
    assert await balances(ledger) == before
    assert (await ledger.get_account(AccountKind.USER, "alice")).held == 0
    with pytest.raises(NotFound):
        await ledger.get_hold("call-1")
    assert await ledger.list_charges() == []
    assert await ledger.verify() == []
    # the refusal left nothing behind: the same call id succeeds once the user can pay
    await ledger.topup("alice", 100)
    retried = await ledger.charge(hold_req("call-1", amount=600))
    assert retried.status is HoldStatus.OK and retried.available == 0


async def test_charge_of_a_call_id_whose_hold_was_voided_or_is_pending_is_a_conflict(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.topup("alice", 5_000)
    assert (await ledger.hold(hold_req("call-v", amount=1_000))).status is HoldStatus.OK
    assert await ledger.void("call-v")
    with pytest.raises(Conflict):
        await ledger.charge(hold_req("call-v", amount=1_000))
    assert (await ledger.hold(hold_req("call-p", amount=1_000))).status is HoldStatus.OK
    with pytest.raises(Conflict):
        await ledger.charge(hold_req("call-p", amount=1_000))
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (5_000, 1_000)
    assert await ledger.list_charges() == []
    assert await ledger.verify() == []


async def test_charge_through_a_key_respects_and_reports_its_spend_limit(ledger: Ledger, hold_req: MakeHold) -> None:
    await ledger.topup("alice", 10_000)
    key = await ledger.create_key(
        user="alice", server="weather", key_hash="h1", prefix="ap_h1", expires_at=None, spend_limit=1_500
    )
    ok = await ledger.charge(hold_req("call-1", amount=1_000, key_id=key.id))
    assert ok.status is HoldStatus.OK and ok.spend_remaining == 500
    refused = await ledger.charge(hold_req("call-2", amount=600, key_id=key.id))
    assert refused.status is HoldStatus.SPEND_LIMIT and refused.charge is None
    assert refused.spend_remaining == 500
    keys = await ledger.list_keys("alice")
    assert [(k.spent, k.held) for k in keys] == [(1_000, 0)]
    assert await balance(ledger, AccountKind.USER, "alice") == 9_000
    assert await ledger.verify() == []


async def test_100_concurrent_charges_of_7_against_1000_charge_exactly_142(ledger: Ledger, hold_req: MakeHold) -> None:
    await ledger.topup("alice", 1_000)
    results = await asyncio.gather(*(ledger.charge(hold_req(f"call-{i}", amount=7)) for i in range(200)))
    ok = [r for r in results if r.status is HoldStatus.OK]
    assert len(ok) == 1_000 // 7 == 142
    assert all(r.status is HoldStatus.INSUFFICIENT_FUNDS and r.charge is None for r in results if r not in ok)
    assert min(r.available for r in results) >= 0
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (1_000 - 142 * 7, 0)
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 142 * 7
    assert len(await ledger.list_charges(limit=500)) == 142
    assert await ledger.verify() == []


async def test_50_concurrent_charges_with_the_same_call_id_charge_exactly_once(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.topup("alice", 10_000)
    results = await asyncio.gather(*(ledger.charge(hold_req("call-once", amount=300)) for _ in range(50)))
    statuses = [r.status for r in results]
    assert statuses.count(HoldStatus.OK) == 1
    assert statuses.count(HoldStatus.REPLAYED) == 49
    assert len({r.charge.id for r in results if r.charge is not None}) == 1
    assert all(r.charge is not None for r in results)
    assert await balance(ledger, AccountKind.USER, "alice") == 9_700
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 300
    assert len(await ledger.list_charges()) == 1
    assert await ledger.verify() == []


async def test_get_hold_returns_the_stored_hold_and_an_unknown_call_is_not_found(
    ledger: Ledger, hold_req: MakeHold, clock: Clock
) -> None:
    await ledger.topup("alice", 5_000)
    start = clock()
    await ledger.hold(hold_req("call-1", amount=700, fee=70, lease_s=45.0, method="service", name="ocr"))
    info = await ledger.get_hold("call-1")
    assert (info.call_id, info.user, info.developer, info.server, info.method, info.name) == (
        "call-1",
        "alice",
        "acme",
        "weather",
        "service",
        "ocr",
    )
    assert (info.amount, info.fee, info.state, info.charge_id) == (700, 70, HoldState.PENDING, None)
    assert (info.created_at, info.expires_at) == (start, start + 45.0)
    with pytest.raises(NotFound):
        await ledger.get_hold("call-unknown")


# --- hold idempotency -------------------------------------------------------------------------
async def test_hold_replayed_with_different_fields_is_an_idempotency_conflict_and_same_fields_replay(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.create_developer("globex")
    await ledger.topup("alice", 5_000)
    assert (await ledger.hold(hold_req("call-1", amount=1_000))).status is HoldStatus.OK
    for different in (
        hold_req("call-1", amount=1_001),
        hold_req("call-1", amount=1_000, name="other"),
        hold_req("call-1", amount=1_000, server="maps"),
        hold_req("call-1", amount=1_000, developer="globex"),
    ):
        with pytest.raises(IdempotencyConflict):
            await ledger.hold(different)
    replay = await ledger.hold(hold_req("call-1", amount=1_000))
    assert replay.status is HoldStatus.REPLAYED and replay.available == 4_000
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (5_000, 1_000)
    assert await ledger.verify() == []


# --- refunds ----------------------------------------------------------------------------------
async def test_refund_with_a_repeated_reference_returns_the_original_and_reuse_elsewhere_conflicts(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.topup("alice", 10_000)
    first_charge = await charged(ledger, hold_req, "call-1", 1_000)
    other_charge = await charged(ledger, hold_req, "call-2", 1_000)
    first = await ledger.refund(first_charge, 400, reference="ticket-1")
    again = await ledger.refund(first_charge, 400, reference="ticket-1")
    assert not first.replayed and again.replayed
    assert (again.id, again.amount, again.kind, again.reference) == (first.id, 400, "refund", "ticket-1")
    without_amount = await ledger.refund(first_charge, reference="ticket-1")
    assert without_amount.replayed and without_amount.id == first.id
    with pytest.raises(IdempotencyConflict):
        await ledger.refund(first_charge, 300, reference="ticket-1")
    with pytest.raises(IdempotencyConflict):
        await ledger.refund(other_charge, 400, reference="ticket-1")
    assert (await ledger.get_charge(first_charge)).refunded == 400
    assert (await ledger.get_charge(other_charge)).refunded == 0
    assert await balance(ledger, AccountKind.USER, "alice") == 8_400
    assert await ledger.verify() == []


async def test_concurrent_refunds_never_exceed_the_charge_and_a_shared_reference_applies_once(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.topup("alice", 10_000)
    charge_id = await charged(ledger, hold_req, "call-1", 1_000, fee=100)
    results = await asyncio.gather(
        *(ledger.refund(charge_id, 300, reference=f"r-{i}") for i in range(10)), return_exceptions=True
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 3
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))
    assert (await ledger.get_charge(charge_id)).refunded == 900

    second = await charged(ledger, hold_req, "call-2", 1_000, fee=100)
    same = await asyncio.gather(*(ledger.refund(second, 250, reference="dup") for _ in range(20)))
    assert len({t.id for t in same}) == 1
    assert [t.replayed for t in same].count(False) == 1
    assert (await ledger.get_charge(second)).refunded == 250
    assert await balance(ledger, AccountKind.USER, "alice") == 10_000 - 2_000 + 900 + 250
    assert await ledger.verify() == []


async def test_refund_references_stored_before_namespaces_keep_replaying_for_their_actor_after_the_migration(
    store: StoreSpec, clock: FakeClock, hold_req: MakeHold
) -> None:
    """Migration 0006 moves the refund references of the previous version into their actor's namespace:
    the service API's "<developer>:<key>" becomes the developer's key, the operator's bare key the
    operator's. Each actor's retry still replays its refund; the other actor's same text does not."""
    ledger = store.open(clock)
    await ledger.open()
    try:
        await ledger.create_user("alice")
        await ledger.create_developer("acme")
        await ledger.topup("alice", 10_000)
        charge_id = await charged(ledger, hold_req, "call-1", 1_000)
        # stored exactly as the previous version stored them
        by_developer = await ledger.refund(charge_id, 100, reference="acme:k1")
        by_operator = await ledger.refund(charge_id, 200, reference="k2")
    finally:
        await ledger.close()
    await store.execute("DELETE FROM schema_migrations WHERE name = ?", "0006_refund_references_per_actor")

    ledger = store.open(clock)
    await ledger.open()  # applies 0006 again, to those rows
    try:
        # deleted above, so present only if applied again (later migrations may follow it in the list)
        assert "0006_refund_references_per_actor" in await ledger.applied_migrations()
        developer_retry = await ledger.refund(charge_id, 100, reference=developer_reference("acme", "k1"))
        operator_retry = await ledger.refund(charge_id, 200, reference=operator_reference("k2"))
        assert developer_retry.replayed and developer_retry.id == by_developer.id
        assert operator_retry.replayed and operator_retry.id == by_operator.id
        # the operator's key "acme:k1" is another key than developer acme's "k1"
        operator_same_text = await ledger.refund(charge_id, 100, reference=operator_reference("acme:k1"))
        assert not operator_same_text.replayed
        assert (await ledger.get_charge(charge_id)).refunded == 400
        assert await ledger.verify() == []
    finally:
        await ledger.close()


# --- capture replays -----------------------------------------------------------------------------
async def test_capturing_a_captured_hold_again_returns_the_original_charge_marked_replayed(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await ledger.topup("alice", 10_000)
    assert (await ledger.hold(hold_req("call-1", amount=1_000, fee=100))).ok
    first = await ledger.capture("call-1", 600)
    again = await ledger.capture("call-1")
    assert not first.replayed and again.replayed
    assert again == first  # the same charge: id, amount, fee, balance after
    assert (again.id, again.amount, again.fee, again.balance_after) == (first.id, 600, 60, 9_400)
    assert not (await ledger.get_charge(first.id)).replayed

    # two captures of one hold at once (one group commit on SQLite, consecutive batches on PostgreSQL)
    assert (await ledger.hold(hold_req("call-2", amount=1_000))).ok
    both = await asyncio.gather(ledger.capture("call-2"), ledger.capture("call-2"))
    assert sorted(charge.replayed for charge in both) == [False, True]
    assert both[0] == both[1]
    assert await balance(ledger, AccountKind.USER, "alice") == 10_000 - 600 - 1_000
    assert await ledger.verify() == []


# --- charge listing ---------------------------------------------------------------------------
async def test_list_charges_is_newest_first_filtered_and_pages_with_a_stable_cursor(
    ledger: Ledger, hold_req: MakeHold, clock: Clock
) -> None:
    await ledger.create_user("bob")
    await ledger.create_developer("globex")
    await ledger.topup("alice", 100_000)
    await ledger.topup("bob", 100_000)
    ids: list[str] = []
    for i in range(7):
        clock.advance(1)
        ids.append(await charged(ledger, hold_req, f"a-{i}", 100 + i))
    # three more at one instant: ties are ordered by id, still without gaps or repeats across pages
    for i in range(3):
        ids.append(await charged(ledger, hold_req, f"b-{i}", 50, user="bob", developer="globex"))
    everything = await ledger.list_charges(limit=100)
    assert len(everything) == 10
    assert [c.id for c in everything[3:]] == list(reversed(ids[:7]))
    assert {c.id for c in everything[:3]} == set(ids[7:])

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        page = await ledger.list_charges(limit=3, before=cursor)
        if not page:
            break
        pages.append([c.id for c in page])
        cursor = page[-1].id
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [cid for p in pages for cid in p] == [c.id for c in everything]

    assert [c.id for c in await ledger.list_charges(developer="acme", limit=2)] == [ids[6], ids[5]]
    assert [c.id for c in await ledger.list_charges(developer="acme", limit=2, before=ids[5])] == [ids[4], ids[3]]
    assert {c.user for c in await ledger.list_charges(user="bob")} == {"bob"}
    assert len(await ledger.list_charges(user="bob", developer="acme")) == 0
    with pytest.raises(InvalidInput):
        await ledger.list_charges(before="ch_no-such-charge")
    with pytest.raises(NotFound):
        await ledger.list_charges(developer="nobody")


async def test_list_charges_keeps_only_the_servers_asked_for_and_pages_within_them(
    ledger: Ledger, hold_req: MakeHold, clock: Clock
) -> None:
    await ledger.topup("alice", 100_000)
    on: dict[str, list[str]] = {"weather": [], "maps": [], "docs": []}
    for i in range(9):
        clock.advance(1)
        server = ("weather", "maps", "docs")[i % 3]
        on[server].append(await charged(ledger, hold_req, f"s-{i}", 100, server=server))
    scoped = await ledger.list_charges(developer="acme", servers=["maps", "docs"], limit=100)
    assert [c.id for c in scoped] == sorted(on["maps"] + on["docs"], key=lambda cid: -int(cid.rsplit("-", 1)[1]))
    assert {c.server for c in scoped} == {"maps", "docs"}
    first = await ledger.list_charges(servers=["maps"], limit=2)
    assert [c.id for c in first] == [on["maps"][2], on["maps"][1]]
    assert [c.id for c in await ledger.list_charges(servers=["maps"], limit=2, before=first[-1].id)] == [on["maps"][0]]
    assert await ledger.list_charges(servers=[]) == []
    with pytest.raises(InvalidInput):  # a charge outside the servers is no cursor for them
        await ledger.list_charges(servers=["maps"], before=on["weather"][0])


# --- service tokens ---------------------------------------------------------------------------
async def test_service_tokens_are_created_found_by_hash_listed_and_revoked_by_prefix(
    ledger: Ledger, clock: Clock
) -> None:
    await ledger.create_developer("globex")
    token = await ledger.create_service_token(
        developer="acme", servers=["weather", "maps"], token_hash="hash-1", prefix="apst_aaa111"
    )
    assert re.fullmatch(r"tok_[0-9a-f]{12}", token.id)
    assert (token.developer, token.servers, token.prefix, token.revoked_at) == (
        "acme",
        ("weather", "maps"),
        "apst_aaa111",
        None,
    )
    assert token.created_at == clock()
    assert await ledger.find_service_token("hash-1") == token
    assert await ledger.find_service_token("hash-unknown") is None

    clock.advance(5)
    second = await ledger.create_service_token(
        developer="acme", servers=["weather"], token_hash="hash-2", prefix="apst_aaa222"
    )
    clock.advance(5)
    other = await ledger.create_service_token(
        developer="globex", servers=["search"], token_hash="hash-3", prefix="apst_bbb333"
    )
    assert [t.id for t in await ledger.list_service_tokens("acme")] == [token.id, second.id]
    assert [t.id for t in await ledger.list_service_tokens()] == [token.id, second.id, other.id]

    with pytest.raises(InvalidInput):
        await ledger.revoke_service_token("apst_aaa")  # matches both of acme's tokens
    with pytest.raises(NotFound):
        await ledger.revoke_service_token("apst_zzz")
    clock.advance(5)
    revoked = await ledger.revoke_service_token("apst_aaa2")
    assert revoked.id == second.id and revoked.revoked_at == clock()
    clock.advance(5)
    assert (await ledger.revoke_service_token(second.id)).revoked_at == revoked.revoked_at  # first revocation kept
    found = await ledger.find_service_token("hash-2")
    assert found is not None and found.revoked_at == revoked.revoked_at
    assert (await ledger.find_service_token("hash-1")) == token  # the other token is untouched


async def test_service_token_refuses_unknown_developers_duplicate_secrets_and_no_servers(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.create_service_token(developer="nobody", servers=["weather"], token_hash="h", prefix="apst_x")
    with pytest.raises(InvalidInput):
        await ledger.create_service_token(developer="acme", servers=[], token_hash="h", prefix="apst_x")
    await ledger.create_service_token(developer="acme", servers=["weather"], token_hash="h", prefix="apst_x")
    with pytest.raises(AlreadyExists):
        await ledger.create_service_token(developer="acme", servers=["weather"], token_hash="h", prefix="apst_y")
    with pytest.raises(NotFound):
        await ledger.list_service_tokens("nobody")
    assert len(await ledger.list_service_tokens("acme")) == 1


# --- payouts ----------------------------------------------------------------------------------
async def earn(ledger: Ledger, hold_req: MakeHold, amount: int) -> None:
    """Give acme ``amount`` of earnings through one charge from alice."""
    await ledger.topup("alice", amount)
    await charged(ledger, hold_req, f"earn-{amount}-{len(await ledger.list_charges(limit=1000))}", amount)


async def test_a_full_payout_moves_all_earnings_to_clearing_and_settling_sends_them_to_the_world(
    ledger: Ledger, hold_req: MakeHold, clock: Clock
) -> None:
    await earn(ledger, hold_req, 2_500)
    created_at = clock()
    payout = await ledger.create_payout("acme")
    assert re.fullmatch(r"po_[0-9a-f]{32}", payout.id)
    assert (payout.developer, payout.amount, payout.state, payout.reference) == ("acme", 2_500, "pending", None)
    assert (payout.created_at, payout.completed_at) == (created_at, None)
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 0
    assert await balance(ledger, AccountKind.PAYOUT_CLEARING) == 2_500
    assert await ledger.verify() == []

    clock.advance(60)
    settled = await ledger.settle_payout(payout.id, "bank-42")
    assert (settled.state, settled.reference, settled.completed_at) == (PayoutState.SETTLED, "bank-42", clock())
    assert await balance(ledger, AccountKind.PAYOUT_CLEARING) == 0
    assert await balance(ledger, AccountKind.WORLD) == -2_500 + 2_500
    assert await ledger.verify() == []

    clock.advance(60)
    assert await ledger.settle_payout(payout.id, "bank-42") == settled  # same reference: the same payout
    with pytest.raises(Conflict):
        await ledger.settle_payout(payout.id, "bank-43")
    with pytest.raises(Conflict):
        await ledger.fail_payout(payout.id)
    assert await ledger.list_payouts("acme") == [settled]
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 0
    assert await ledger.verify() == []


async def test_a_partial_payout_that_fails_returns_the_money_to_the_developer(
    ledger: Ledger, hold_req: MakeHold, clock: Clock
) -> None:
    await earn(ledger, hold_req, 1_000)
    payout = await ledger.create_payout("acme", 300)
    assert (payout.amount, payout.state) == (300, PayoutState.PENDING)
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 700
    assert await balance(ledger, AccountKind.PAYOUT_CLEARING) == 300
    assert await ledger.verify() == []

    clock.advance(10)
    failed = await ledger.fail_payout(payout.id)
    assert (failed.state, failed.completed_at, failed.reference) == (PayoutState.FAILED, clock(), None)
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 1_000
    assert await balance(ledger, AccountKind.PAYOUT_CLEARING) == 0
    assert await balance(ledger, AccountKind.WORLD) == -1_000
    with pytest.raises(Conflict):
        await ledger.settle_payout(payout.id, "bank-1")
    with pytest.raises(Conflict):
        await ledger.fail_payout(payout.id)
    assert await ledger.verify() == []


async def test_payouts_refuse_more_than_the_earnings_nothing_to_pay_and_unknown_ids(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    with pytest.raises(InvalidInput):
        await ledger.create_payout("acme")  # nothing earned yet
    await earn(ledger, hold_req, 1_000)
    with pytest.raises(Conflict):
        await ledger.create_payout("acme", 1_001)
    with pytest.raises(InvalidInput):
        await ledger.create_payout("acme", 0)
    with pytest.raises(InvalidInput):
        await ledger.create_payout("acme", -5)
    with pytest.raises(NotFound):
        await ledger.create_payout("nobody")
    with pytest.raises(NotFound):
        await ledger.settle_payout("po_unknown", "bank-1")
    with pytest.raises(NotFound):
        await ledger.fail_payout("po_unknown")
    assert await ledger.list_payouts() == []
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 1_000
    assert await ledger.verify() == []


async def test_two_concurrent_payouts_of_the_whole_balance_pay_it_exactly_once(
    ledger: Ledger, hold_req: MakeHold
) -> None:
    await earn(ledger, hold_req, 1_000)
    results = await asyncio.gather(ledger.create_payout("acme"), ledger.create_payout("acme"), return_exceptions=True)
    paid = [r for r in results if isinstance(r, Payout)]
    assert len(paid) == 1 and paid[0].amount == 1_000
    assert all(isinstance(r, InvalidInput) for r in results if not isinstance(r, Payout))

    await earn(ledger, hold_req, 800)
    results = await asyncio.gather(
        ledger.create_payout("acme", 800), ledger.create_payout("acme", 800), return_exceptions=True
    )
    assert sum(isinstance(r, Payout) for r in results) == 1
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, Payout))
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 0
    assert await balance(ledger, AccountKind.PAYOUT_CLEARING) == 1_800
    assert await ledger.verify() == []


async def test_many_concurrent_partial_payouts_never_overdraw_the_developer(ledger: Ledger, hold_req: MakeHold) -> None:
    await earn(ledger, hold_req, 1_000)
    results = await asyncio.gather(*(ledger.create_payout("acme", 300) for _ in range(20)), return_exceptions=True)
    assert sum(isinstance(r, Payout) for r in results) == 3
    assert all(isinstance(r, Conflict) for r in results if not isinstance(r, Payout))
    assert await balance(ledger, AccountKind.DEVELOPER, "acme") == 100
    assert sum(p.amount for p in await ledger.list_payouts("acme")) == 900
    assert await ledger.verify() == []


# --- statement and breakdown ------------------------------------------------------------------
async def test_statement_and_breakdown_account_for_every_charge_refund_and_payout(
    ledger: Ledger, hold_req: MakeHold, clock: Clock
) -> None:
    await ledger.topup("alice", 100_000)
    clock.advance(1)
    c1 = await charged(ledger, hold_req, "c1", 1_000, fee=100)  # acme +900, weather/forecast
    clock.advance(1)
    c2 = await charged(ledger, hold_req, "c2", 2_000, fee=200)  # acme +1800, weather/forecast
    clock.advance(1)
    c3 = await charged(ledger, hold_req, "c3", 500, server="maps", name="route")  # acme +500
    clock.advance(1)
    r1 = await ledger.refund(c2, 1_000)  # acme -900 (fee share 100 back from the platform)
    clock.advance(1)
    p1 = await ledger.create_payout("acme", 1_000)  # acme -1000
    clock.advance(1)
    await ledger.settle_payout(p1.id, "bank-1")  # does not touch acme's earnings
    clock.advance(1)
    p2 = await ledger.create_payout("acme")  # the rest: 900 + 1800 + 500 - 900 - 1000 = 1300
    assert p2.amount == 1_300
    clock.advance(1)
    await ledger.fail_payout(p2.id)  # acme +1300

    lines = await ledger.statement("acme")
    assert [(line.kind, line.amount) for line in lines] == [
        ("payout_fail", 1_300),
        ("payout", -1_300),
        ("payout", -1_000),
        ("refund", -900),
        ("charge", 500),
        ("charge", 1_800),
        ("charge", 900),
    ]
    assert sum(line.amount for line in lines) == await balance(ledger, AccountKind.DEVELOPER, "acme") == 1_300
    refund_line = lines[3]
    assert (refund_line.transfer_id, refund_line.charge_id) == (r1.id, c2)
    assert (refund_line.server, refund_line.name) == ("weather", "forecast")
    assert [line.transfer_id for line in lines[4:]] == [c3, c2, c1]
    assert [(line.server, line.name) for line in lines[4:]] == [
        ("maps", "route"),
        ("weather", "forecast"),
        ("weather", "forecast"),
    ]
    assert all(line.server is None and line.name is None for line in lines[:3])
    assert [line.created_at for line in lines] == sorted((line.created_at for line in lines), reverse=True)

    page1 = await ledger.statement("acme", limit=4)
    page2 = await ledger.statement("acme", limit=4, before=page1[-1].transfer_id)
    assert page1 + page2 == lines
    with pytest.raises(InvalidInput):
        await ledger.statement("acme", before="tr_not-a-movement-of-acme")

    assert await ledger.earnings_breakdown("acme") == [
        EarningsBreakdown("acme", "maps", "route", 1, 500),
        EarningsBreakdown("acme", "weather", "forecast", 2, 900 + 1_800 - 900),
    ]
    earned = await ledger.earnings("acme")
    assert (earned.earnings, earned.lifetime) == (1_300, 2_300)
    assert await ledger.verify() == []


async def test_statement_and_breakdown_of_a_developer_without_activity_are_empty(ledger: Ledger) -> None:
    assert await ledger.statement("acme") == []
    assert await ledger.earnings_breakdown("acme") == []
    with pytest.raises(NotFound):
        await ledger.statement("nobody")
    with pytest.raises(NotFound):
        await ledger.earnings_breakdown("nobody")
