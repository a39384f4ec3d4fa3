"""Each ledger store (SQLite, PostgreSQL) against a tiny in-memory model (Hypothesis stateful testing).

After every step the balances of every account, held amounts and key spend must equal the model's,
and ``verify()`` must be clean.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.errors import Conflict
from gateway.ledger.base import AccountKind, HoldRequest, HoldStatus

from .conftest import FakeClock, StoreSpec

T = TypeVar("T")
USERS = ("ann", "bob")
LEASE_S = 10.0
KEY_LIMIT = 6_000  # ann's key has a cap; bob's has none


@dataclass
class ModelHold:
    user: str
    amount: int
    fee: int
    lease_expires_at: float
    state: str = "pending"


@dataclass
class ModelCharge:
    user: str
    amount: int
    fee: int
    refunded: int = 0


class LedgerMachine(RuleBasedStateMachine):
    store_kind = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-model-"))
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.store = StoreSpec.fresh(self.store_kind, self.dir)
        self.ledger = self.store.open(self.clock)
        self.run(self.ledger.open())
        self.keys: dict[str, str] = {}
        for user in USERS:
            self.run(self.ledger.create_user(user))
            key = self.run(
                self.ledger.create_key(
                    user=user,
                    server="s",
                    key_hash=f"hash-{user}",
                    prefix=f"ap_{user}",
                    expires_at=None,
                    spend_limit=KEY_LIMIT if user == "ann" else None,
                )
            )
            self.keys[user] = key.id
        self.run(self.ledger.create_developer("dev"))
        # the model
        self.balance = dict.fromkeys(USERS, 0)
        self.world = 0
        self.developer = 0
        self.platform = 0
        self.spent = dict.fromkeys(USERS, 0)
        self.holds: dict[str, ModelHold] = {}
        self.charges: dict[str, ModelCharge] = {}
        self.calls = 0

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.ledger.close())
        self.run(self.store.drop())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def held(self, user: str) -> int:
        return sum(h.amount for h in self.holds.values() if h.user == user and h.state == "pending")

    def pending(self) -> list[str]:
        return sorted(c for c, h in self.holds.items() if h.state == "pending")

    def refundable(self) -> list[str]:
        return sorted(c for c, ch in self.charges.items() if ch.refunded < ch.amount)

    # --- steps ------------------------------------------------------------------------------------
    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 5_000))
    def topup(self, user: str, amount: int) -> None:
        self.run(self.ledger.topup(user, amount))
        self.balance[user] += amount
        self.world -= amount

    @rule(user=st.sampled_from(USERS), amount=st.integers(1, 3_000), fee_pct=st.integers(0, 100))
    def hold(self, user: str, amount: int, fee_pct: int) -> None:
        self.calls += 1
        call_id = f"call-{self.calls}"
        fee = amount * fee_pct // 100
        outcome = self.run(
            self.ledger.hold(
                HoldRequest(call_id, self.keys[user], user, "dev", "s", "tools/call", "t", amount, fee, LEASE_S, "m")
            )
        )
        available = self.balance[user] - self.held(user)
        key_used = self.spent[user] + self.held(user)
        if available < amount:
            assert outcome.status is HoldStatus.INSUFFICIENT_FUNDS
            assert outcome.available == available
        elif user == "ann" and key_used + amount > KEY_LIMIT:
            assert outcome.status is HoldStatus.SPEND_LIMIT
            assert outcome.spend_remaining == KEY_LIMIT - key_used
        else:
            assert outcome.status is HoldStatus.OK
            assert outcome.available == available - amount
            self.holds[call_id] = ModelHold(user, amount, fee, self.clock.now + LEASE_S)

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def replay_hold(self, data: st.DataObject) -> None:
        call_id = data.draw(st.sampled_from(sorted(self.holds)))
        h = self.holds[call_id]
        outcome = self.run(
            self.ledger.hold(
                HoldRequest(call_id, self.keys[h.user], h.user, "dev", "s", "tools/call", "t", h.amount, h.fee, 1, "m")
            )
        )
        assert outcome.status is HoldStatus.REPLAYED

    @precondition(lambda self: bool(self.pending()))
    @rule(data=st.data())
    def capture(self, data: st.DataObject) -> None:
        call_id = data.draw(st.sampled_from(self.pending()))
        h = self.holds[call_id]
        amount = data.draw(st.none() | st.integers(1, h.amount))
        charge = self.run(self.ledger.capture(call_id, amount))
        charged = h.amount if amount is None else amount
        fee = h.fee * charged // h.amount
        assert (charge.amount, charge.fee) == (charged, fee)
        h.state = "captured"
        self.balance[h.user] -= charged
        self.developer += charged - fee
        self.platform += fee
        self.spent[h.user] += charged
        self.charges[charge.id] = ModelCharge(h.user, charged, fee)
        assert charge.balance_after == self.balance[h.user] - self.held(h.user)
        assert self.run(self.ledger.capture(call_id)) == charge  # idempotent

    @precondition(lambda self: bool(self.holds))
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        call_id = data.draw(st.sampled_from(sorted(self.holds)))
        h = self.holds[call_id]
        assert self.run(self.ledger.void(call_id)) is (h.state == "pending")
        if h.state == "pending":
            h.state = "voided"
        if h.state == "voided":
            with pytest.raises(Conflict):
                self.run(self.ledger.capture(call_id))

    @precondition(lambda self: bool(self.pending()))
    @rule(data=st.data())
    def renew(self, data: st.DataObject) -> None:
        call_id = data.draw(st.sampled_from(self.pending()))
        self.run(self.ledger.renew([call_id], LEASE_S))
        self.holds[call_id].lease_expires_at = self.clock.now + LEASE_S

    @rule(seconds=st.integers(0, 15))
    def time_passes_and_sweep_runs(self, seconds: int) -> None:
        self.clock.advance(seconds)
        lapsed = [c for c in self.pending() if self.holds[c].lease_expires_at < self.clock.now]
        assert self.run(self.ledger.sweep()) == len(lapsed)
        for call_id in lapsed:
            self.holds[call_id].state = "voided"

    @precondition(lambda self: bool(self.refundable()))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        charge_id = data.draw(st.sampled_from(self.refundable()))
        ch = self.charges[charge_id]
        remaining = ch.amount - ch.refunded
        amount = data.draw(st.none() | st.integers(1, remaining + 2))
        if amount is not None and amount > remaining:
            with pytest.raises(Conflict):
                self.run(self.ledger.refund(charge_id, amount))
            return
        transfer = self.run(self.ledger.refund(charge_id, amount))
        refunded = remaining if amount is None else amount
        assert transfer.amount == refunded
        fee_share = ch.fee * (ch.refunded + refunded) // ch.amount - ch.fee * ch.refunded // ch.amount
        ch.refunded += refunded
        self.balance[ch.user] += refunded
        self.developer -= refunded - fee_share
        self.platform -= fee_share
        self.spent[ch.user] -= refunded

    # --- invariants -------------------------------------------------------------------------------
    @invariant()
    def balances_match_the_model(self) -> None:
        for user in USERS:
            account = self.run(self.ledger.get_account(AccountKind.USER, user))
            assert (account.balance, account.held) == (self.balance[user], self.held(user)), user
            key = self.run(self.ledger.find_key(f"hash-{user}"))
            assert key is not None and (key.spent, key.held) == (self.spent[user], self.held(user))
        assert self.run(self.ledger.get_account(AccountKind.WORLD, "system")).balance == self.world
        assert self.run(self.ledger.get_account(AccountKind.DEVELOPER, "dev")).balance == self.developer
        assert self.run(self.ledger.get_account(AccountKind.PLATFORM_FEE, "system")).balance == self.platform
        earnings = self.run(self.ledger.earnings("dev"))
        assert earnings.lifetime == self.developer

    @invariant()
    def verify_is_clean(self) -> None:
        assert self.run(self.ledger.verify()) == []


class PostgresLedgerMachine(LedgerMachine):
    store_kind = "postgres"


for _machine in (LedgerMachine, PostgresLedgerMachine):
    _machine.TestCase.settings = settings(
        max_examples=30,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TestLedgerAgainstModel = LedgerMachine.TestCase
TestPostgresLedgerAgainstModel = PostgresLedgerMachine.TestCase
