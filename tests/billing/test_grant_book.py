"""``GrantBook`` (gateway/billing/grants.py) against a real SQLite ledger: what a process does with
the grants it takes when it drains or dies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.billing.grants import GrantPolicy
from gateway.billing.settlement import Billing
from gateway.ledger.base import AccountKind, HoldRequest
from gateway.ledger.grants import GrantRequest, GrantState
from gateway.ledger.sqlite import SqliteLedger

PRICE = 1_000
POLICY = GrantPolicy(min_calls=2, share=2, target_s=0.05)


class GatedGrants:
    """The real ledger, except that ``grant`` (taking or topping up a grant) waits for ``opened``."""

    def __init__(self, ledger: SqliteLedger) -> None:
        self._ledger = ledger
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def grant(self, req: GrantRequest) -> GrantState:
        self.entered.set()
        await self.opened.wait()
        return await self._ledger.grant(req)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[tuple[SqliteLedger, str]]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        await ledger.create_user("ann")
        await ledger.create_developer("dev")
        await ledger.topup("ann", 100 * PRICE)
        key = await ledger.create_key(
            user="ann", server="s", key_hash="h", prefix="ap_1", expires_at=None, spend_limit=None
        )
        yield ledger, key.id
    finally:
        await ledger.close()


def _req(call_id: str, key_id: str) -> HoldRequest:
    return HoldRequest(call_id, key_id, "ann", "dev", "s", "tools/call", "t", PRICE, 0, 30.0, "-")


async def test_a_drain_waits_for_a_top_up_in_flight_and_gives_its_grant_back(
    ledger: tuple[SqliteLedger, str],
) -> None:
    store, key_id = ledger
    billing = Billing(store, owner="p1", lease_s=30.0, sweep_interval_s=1.0, grants=POLICY)
    assert billing.grants is not None
    gated = GatedGrants(store)
    billing.grants.ledger = gated  # type: ignore[assignment]
    gated.opened.set()
    assert (await billing.hold(_req("call-1", key_id))).ok  # takes a grant of two calls' worth
    gated.opened.clear()
    gated.entered.clear()
    assert (await billing.hold(_req("call-2", key_id))).ok  # its last call's worth: a top-up starts ahead
    await gated.entered.wait()
    (top_up,) = [g.extending for g in billing.grants._grants.values() if g.extending is not None]
    billing.settle("call-1", capture=True)
    await asyncio.shield(billing.settle("call-2", capture=True))  # written: the grant's row is spent and closed

    async def drain() -> None:
        await billing.wait_settled()
        await billing.close()

    draining = asyncio.get_running_loop().create_task(drain())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not draining.done()  # the drain waits for the top-up in flight ...
    gated.opened.set()
    await draining
    assert top_up.done()
    await top_up
    assert await store.grants_outstanding("ann") == 0  # ... and gives back the grant it topped up
    account = await store.get_account(AccountKind.USER, "ann")
    assert (account.balance, account.held) == (98 * PRICE, 0)
    assert await store.verify() == []


async def test_a_dying_process_takes_its_running_top_up_down_with_it(ledger: tuple[SqliteLedger, str]) -> None:
    """The top-up task is one of the process's tracked tasks: cancelling them all (what a kill does
    in the model test) leaves no grant taken behind the dead process's back."""
    store, key_id = ledger
    billing = Billing(store, owner="p1", lease_s=30.0, sweep_interval_s=1.0, grants=POLICY)
    assert billing.grants is not None
    gated = GatedGrants(store)
    billing.grants.ledger = gated  # type: ignore[assignment]
    call = asyncio.get_running_loop().create_task(billing.hold(_req("call-1", key_id)))
    await gated.entered.wait()
    assert billing.settling == 1  # the top-up in flight
    for task in list(billing._settling):
        task.cancel()
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    gated.opened.set()
    await asyncio.sleep(0)
    assert billing.settling == 0
    assert await store.grants_outstanding("ann") == 0
