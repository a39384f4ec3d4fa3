"""Holds and captures that arrive together are committed together (group commit, and on SQLite
one vector of statements per run), yet every caller gets exactly its own answer: its error, its
refusal, its replay, and nothing of anybody else's."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, Charge, HoldOutcome, HoldStatus
from gateway.ledger.interfaces import Ledger
from gateway.ledger.sqlite import SqliteLedger

from .conftest import HoldFactory, StoreSpec, thread_paused


@contextmanager
def writer_paused(ledger: Ledger) -> Iterator[None]:
    """On SQLite, keep the writer thread busy so that everything queued meanwhile is one group."""
    if not isinstance(ledger, SqliteLedger):
        yield
        return
    with thread_paused(ledger._writer):
        yield


async def together(ledger: Ledger, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Start every call, let them all queue, then let the writer run them; results or exceptions."""
    with writer_paused(ledger):
        tasks = [asyncio.ensure_future(call()) for call in calls]
        await asyncio.sleep(0)  # one loop pass: every task reaches the ledger's queue
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def keyed(ledger: Ledger, user: str, spend_limit: int | None, tag: str) -> str:
    key = await ledger.create_key(
        user=user,
        server="weather",
        key_hash="hash-" + tag,
        prefix="ap_" + tag,
        expires_at=None,
        spend_limit=spend_limit,
    )
    return key.id


async def test_a_group_of_captures_gives_each_caller_its_own_charge_or_error(
    ledger: Ledger, hold_req: HoldFactory
) -> None:
    await ledger.topup("alice", 1_000)
    key = await keyed(ledger, "alice", None, "k1")
    for call_id in ("ok-1", "ok-2", "partial", "voided", "too-much", "twice"):
        assert (await ledger.hold(hold_req(call_id, amount=100, fee=10, key_id=key))).ok
    await ledger.void("voided")

    results = await together(
        ledger,
        [
            lambda: ledger.capture("ok-1"),
            lambda: ledger.capture("missing"),
            lambda: ledger.capture("ok-2"),
            lambda: ledger.capture("voided"),
            lambda: ledger.capture("partial", 40),
            lambda: ledger.capture("too-much", 101),
            lambda: ledger.capture("twice"),
            lambda: ledger.capture("twice"),
        ],
    )
    ok1, missing, ok2, voided, partial, too_much, twice_a, twice_b = results
    assert isinstance(ok1, Charge) and (ok1.id, ok1.amount, ok1.fee) == ("ch_ok-1", 100, 10)
    assert isinstance(missing, NotFound)
    assert isinstance(ok2, Charge) and ok2.amount == 100
    assert isinstance(voided, Conflict)
    assert isinstance(partial, Charge) and (partial.amount, partial.fee) == (40, 4)
    assert isinstance(too_much, InvalidInput)
    assert isinstance(twice_a, Charge) and isinstance(twice_b, Charge) and twice_a.id == twice_b.id == "ch_twice"

    # A capture never lowers the available balance, so the last one's balance_after (the highest) is
    # what the account shows now.
    charges = [ok1, ok2, partial, twice_a]
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (1_000 - 340, 100)  # "too-much" is still pending
    assert max(c.balance_after for c in charges) == account.balance - account.held == 560
    assert (await ledger.earnings("acme")).earnings == 340 - 34
    for c in charges:
        assert await ledger.get_charge(c.id) == c
    assert await ledger.verify() == []


async def test_a_group_of_holds_gives_each_caller_its_own_outcome(
    ledger: Ledger, hold_req: HoldFactory, store: StoreSpec
) -> None:
    await ledger.topup("alice", 1_000)
    await ledger.create_user("bob")
    capped = await keyed(ledger, "alice", 150, "capped")
    bobs = await keyed(ledger, "bob", None, "bob")
    assert (await ledger.hold(hold_req("earlier", amount=50))).ok

    results = await together(
        ledger,
        [
            lambda: ledger.hold(hold_req("a", amount=100, key_id=capped)),
            lambda: ledger.hold(hold_req("no-user", amount=10, user="nobody")),
            lambda: ledger.hold(hold_req("no-dev", amount=10, developer="nobody")),
            lambda: ledger.hold(hold_req("no-key", amount=10, key_id="key-that-does-not-exist")),
            lambda: ledger.hold(hold_req("bobs-key", amount=10, key_id=bobs)),
            lambda: ledger.hold(hold_req("earlier", amount=50)),
            lambda: ledger.hold(hold_req("earlier", amount=60)),
            lambda: ledger.hold(hold_req("over-cap", amount=160, key_id=capped)),
            lambda: ledger.hold(hold_req("b", amount=90)),
            lambda: ledger.hold(hold_req("too-big", amount=2_000)),
            lambda: ledger.hold(hold_req("a", amount=100, key_id=capped)),
        ],
    )
    a, no_user, no_dev, no_key, bobs_key, replay, conflict, over_cap, b, too_big, a_again = results
    # Concurrent callers: any order is possible (on PostgreSQL they run on several connections), so
    # only what holds in every order is asserted.
    assert isinstance(a, HoldOutcome) and isinstance(a_again, HoldOutcome)
    assert {a.status, a_again.status} == {HoldStatus.OK, HoldStatus.REPLAYED}
    assert next(o for o in (a, a_again) if o.status is HoldStatus.OK).spend_remaining == 50
    assert isinstance(no_user, NotFound) and isinstance(no_dev, NotFound) and isinstance(no_key, NotFound)
    assert isinstance(bobs_key, InvalidInput)
    assert isinstance(replay, HoldOutcome) and replay.status is HoldStatus.REPLAYED
    assert isinstance(conflict, IdempotencyConflict)
    assert isinstance(over_cap, HoldOutcome) and over_cap.status is HoldStatus.SPEND_LIMIT
    assert isinstance(b, HoldOutcome) and b.status is HoldStatus.OK
    assert isinstance(too_big, HoldOutcome) and too_big.status is HoldStatus.INSUFFICIENT_FUNDS
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (1_000, 240)
    assert await store.fetchval("SELECT held FROM keys WHERE id = ?", capped) == 100
    assert await ledger.verify() == []


async def test_captures_queued_with_holds_free_money_the_holds_can_use(ledger: Ledger, hold_req: HoldFactory) -> None:
    """Captures of smaller amounts than held return the rest to the balance; holds queued in the same
    group never see more than the balance allows, and the ledger stays balanced."""
    await ledger.topup("alice", 300)
    for i in range(3):
        assert (await ledger.hold(hold_req(f"held-{i}", amount=100))).ok
    calls: list[Callable[[], Awaitable[Any]]] = []
    for i in range(3):
        calls.append(functools.partial(ledger.capture, f"held-{i}", 50))
        calls.append(functools.partial(ledger.hold, hold_req(f"new-{i}", amount=60)))
    results = await together(ledger, calls)
    assert all(isinstance(r, Charge) for r in results[0::2])
    holds = results[1::2]
    assert all(isinstance(r, HoldOutcome) for r in holds)
    granted = sum(1 for r in holds if r.status is HoldStatus.OK)
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert account.balance == 150
    assert account.held == 60 * granted <= 150
    assert await ledger.verify() == []


@pytest.mark.parametrize("size", [2, 64, 600])
async def test_a_large_group_of_hold_capture_pairs_charges_each_exactly_once(
    ledger: Ledger, hold_req: HoldFactory, size: int
) -> None:
    await ledger.topup("alice", 10 * size)
    holds = await together(
        ledger, [functools.partial(ledger.hold, hold_req(f"c{i}", amount=7, fee=1)) for i in range(size)]
    )
    assert all(isinstance(h, HoldOutcome) and h.status is HoldStatus.OK for h in holds)
    assert sorted(h.available for h in holds) == [10 * size - 7 * n for n in range(size, 0, -1)]
    charges = await together(ledger, [functools.partial(ledger.capture, f"c{i}") for i in range(size)])
    assert len({c.id for c in charges}) == size
    assert {c.balance_after for c in charges} == {10 * size - 7 * size}  # a full capture frees nothing
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (10 * size - 7 * size, 0)
    assert (await ledger.earnings("acme")).earnings == 6 * size
    assert await ledger.verify() == []


async def test_a_check_constraint_failure_in_a_group_fails_only_its_own_capture(
    ledger: Ledger, hold_req: HoldFactory, store: StoreSpec
) -> None:
    """A row edited behind the ledger's back makes one capture's write fail; the group is replayed
    one at a time, so only that caller sees the error."""
    await ledger.topup("alice", 1_000)
    for call_id in ("fine-1", "broken", "fine-2"):
        assert (await ledger.hold(hold_req(call_id, amount=100))).ok
    # A tampered hold: its amount says more than the account has held, so releasing it would take
    # `held` below zero, which a CHECK constraint refuses.
    await store.execute("UPDATE holds SET amount = 5000 WHERE call_id = ?", "broken")
    results = await together(
        ledger, [lambda: ledger.capture("fine-1"), lambda: ledger.capture("broken"), lambda: ledger.capture("fine-2")]
    )
    assert isinstance(results[0], Charge) and isinstance(results[2], Charge)
    assert isinstance(results[1], Exception)
    account = await ledger.get_account(AccountKind.USER, "alice")
    assert account.balance == 800
