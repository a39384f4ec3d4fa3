"""Credit grants against a model (Hypothesis stateful testing): several gateway processes (each its own
``Billing`` with grants on) share one real ledger; calls, metered captures, voids, top-ups, refunds,
revocations, lease expiries and process deaths come in any order.

After every step: ``ledger verify`` is clean, the user's balance never goes below what is held (no
overdraft), money is conserved (balance = top-ups - charges + refunds), and every capture a process
was told about is charged exactly once, unless a death or an expiry lost it (then charged <= told,
never more). And a burst of concurrent calls at the end of a balance succeeds exactly ⌊B/p⌋ times.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gateway.billing.grants import GrantPolicy
from gateway.billing.settlement import Billing
from gateway.ledger.base import AccountKind, HoldRequest
from tests.ledger.conftest import FakeClock, StoreSpec

T = TypeVar("T")
LEASE_S = 30.0
PRICES = (1_000, 1_500)
POLICY = GrantPolicy(flush_s=0.001, idle_s=0.05, target_s=0.05, min_calls=2, share=2, refresh_s=0.02)


@dataclass
class Process:
    billing: Billing
    task: asyncio.Task[None]


@dataclass
class InFlight:
    process: str
    call_id: str
    price: int


class GrantsMachine(RuleBasedStateMachine):
    store_kind = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="grants-model-"))
        self.loop = asyncio.new_event_loop()
        self.clock = FakeClock()
        self.skipped = 0.0  # seconds the simulated time jumped (the processes' monotonic clocks jump too)
        self.store = StoreSpec.fresh(self.store_kind, self.dir)
        self.ledger = self.store.open(self.clock)
        self.run(self.ledger.open())
        self.run(self.ledger.create_user("ann"))
        self.run(self.ledger.create_developer("dev"))
        self.keys = 0
        self.key_id = self.run(self._new_key())
        self.processes: dict[str, Process] = {}
        self.generation = 0
        for name in ("p1", "p2", "p3"):
            self.processes[name] = self.run(self._start(name))
        self.calls = 0
        self.inflight: list[InFlight] = []
        self.topped = 0
        self.told = 0  # captured, as the processes were told (what delivered calls cost)
        self.refunded = 0
        self.lossy = False  # a death or an expiry may have lost captures

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 60))

    async def _new_key(self) -> str:
        self.keys += 1
        record = await self.ledger.create_key(
            user="ann",
            server="s",
            key_hash=f"hash-{self.keys}",
            prefix=f"ap_{self.keys}",
            expires_at=None,
            spend_limit=None,
        )
        return record.id

    async def _start(self, name: str) -> Process:
        self.generation += 1
        billing = Billing(
            self.ledger,
            owner=f"{name}-{self.generation}",
            lease_s=LEASE_S,
            sweep_interval_s=1.0,
            grants=POLICY,
            grants_clock=lambda: time.monotonic() + self.skipped,
        )
        return Process(billing, asyncio.get_running_loop().create_task(billing.renew_forever()))

    def teardown(self) -> None:
        for process in self.processes.values():
            process.task.cancel()
        self.run(asyncio.sleep(0))
        self.run(self.ledger.close())
        self.run(self.store.drop())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _req(self, process: str, price: int) -> HoldRequest:
        self.calls += 1
        return HoldRequest(
            f"call-{self.calls}", self.key_id, "ann", "dev", "s", "tools/call", "t", price, price // 10, LEASE_S, "-"
        )

    async def _settle(self, process: str, call_id: str, price: int, capture: bool, used: int) -> None:
        billing = self.processes[process].billing
        amount = max(1, price * used // 100)
        await asyncio.shield(billing.settle(call_id, capture=capture, amount=amount if capture else None))
        if capture:
            self.told += amount

    async def _flush_all(self) -> None:
        for process in self.processes.values():  # every settle was awaited: only queued captures are left
            if process.billing.grants is not None:
                await process.billing.grants.flush()

    # --- steps ------------------------------------------------------------------------------------
    @rule(
        process=st.sampled_from(("p1", "p2", "p3")),
        price=st.sampled_from(PRICES),
        settle=st.sampled_from(("capture", "void", "later")),
        used=st.sampled_from((100, 100, 40)),
    )
    def call(self, process: str, price: int, settle: str, used: int) -> None:
        req = self._req(process, price)
        outcome = self.run(self.processes[process].billing.hold(req))
        if not outcome.ok:
            return
        if settle == "later":
            self.inflight.append(InFlight(process, req.call_id, price))
        else:
            self.run(self._settle(process, req.call_id, price, settle == "capture", used))

    @precondition(lambda self: bool(self.inflight))
    @rule(data=st.data(), capture=st.booleans())
    def settle_later(self, data: st.DataObject, capture: bool) -> None:
        call = self.inflight.pop(data.draw(st.integers(0, len(self.inflight) - 1)))
        self.run(self._settle(call.process, call.call_id, call.price, capture, 100))

    @rule(amount=st.sampled_from((3_000, 20_000, 60_000)))
    def topup(self, amount: int) -> None:
        self.run(self.ledger.topup("ann", amount))
        self.topped += amount

    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        self.run(self._flush_all())
        charges = [c for c in self.run(self.ledger.list_charges(user="ann", limit=20)) if c.refunded < c.amount]
        if not charges:
            return
        charge = data.draw(st.sampled_from(charges))
        self.run(self.ledger.refund(charge.id))
        self.refunded += charge.amount - charge.refunded

    @rule()
    def revoke_key(self) -> None:
        """The key is revoked (its grants go back within a refresh) and calls go on with a new one."""
        self.run(self.ledger.revoke_key(self.key_id))
        self.key_id = self.run(self._new_key())

    @rule()
    def expire_leases(self) -> None:
        """Time jumps past every lease (a process stalled): the sweep voids grants and holds."""
        self.clock.advance(LEASE_S + 1)
        self.skipped += LEASE_S + 1
        self.run(self.ledger.sweep())
        self.lossy = True

    @rule(process=st.sampled_from(("p1", "p2", "p3")))
    def kill(self, process: str) -> None:
        """SIGKILL: the process's queued captures and calls in flight are lost; its grants return at
        the sweep after their lease; a new process takes its place."""
        dead = self.processes[process]
        tasks = [dead.task, *dead.billing._settling]  # its lease keeper, flushes and grant top-ups
        for task in tasks:
            task.cancel()
        # Whatever a dying process had sent may still commit, but nothing it does comes after the
        # sweep below (a real process cannot commit once it is gone and its leases have lapsed).
        self.run(asyncio.wait(tasks))
        self.inflight = [c for c in self.inflight if c.process != process]
        self.processes[process] = self.run(self._start(process))
        self.clock.advance(LEASE_S + 1)  # the other processes' grants lapse too
        self.skipped += LEASE_S + 1
        self.run(self.ledger.sweep())
        self.lossy = True

    @precondition(lambda self: not self.inflight)
    @rule(price=st.sampled_from(PRICES), extra=st.integers(1, 6))
    def burst_at_the_end_of_the_balance(self, price: int, extra: int) -> None:
        """Concurrent calls spread over every process against what is left: exactly ⌊B/p⌋ succeed."""

        async def burst() -> int:
            await self._flush_all()
            for process in self.processes.values():
                assert process.billing.grants is not None
                await process.billing.grants.refresh()  # a lapsed grant is known lost before the burst
            ann = await self.ledger.get_account(AccountKind.USER, "ann")
            spendable = ann.balance  # nothing in flight: everything held is grants, which drain
            n = spendable // price + extra
            names = sorted(self.processes)

            async def one(i: int) -> bool:
                process = names[i % len(names)]
                req = self._req(process, price)
                outcome = await self.processes[process].billing.hold(req)
                if outcome.ok:
                    await self._settle(process, req.call_id, price, True, 100)
                return outcome.ok

            results = await asyncio.gather(*(one(i) for i in range(n)))
            if sum(results) != spendable // price:
                agg = "group_concat(x, ' ')" if self.store.kind == "sqlite" else "string_agg(x, ' ')"
                pending = await self.store.fetchval(
                    f"SELECT {agg} FROM (SELECT call_id || ':' || amount || ':' || owner AS x FROM holds "
                    "WHERE state = 'pending') p"
                )
                books = {
                    name: [
                        (
                            g.db_id,
                            g.remaining,
                            g.busy,
                            g.extending is not None,
                            g.releasing,
                            g.low_until - time.monotonic() - self.skipped,
                        )
                        for g in proc.billing.grants._grants.values()  # type: ignore[union-attr]
                    ]
                    for name, proc in self.processes.items()
                }
                ann2 = await self.ledger.get_account(AccountKind.USER, "ann")
                raise AssertionError((sum(results), spendable, price, pending, books, ann2))
            return sum(results)

        self.run(burst())

    # --- invariants -------------------------------------------------------------------------------
    @invariant()
    def money_is_conserved_and_never_overdrawn(self) -> None:
        async def check() -> None:
            await self._flush_all()
            assert await self.ledger.verify() == []
            ann = await self.ledger.get_account(AccountKind.USER, "ann")
            assert ann.balance >= ann.held >= 0
            charged = sum(c.amount for c in await self.ledger.list_charges(user="ann", limit=100_000))
            assert ann.balance == self.topped - charged + self.refunded
            if self.lossy:
                assert charged <= self.told
            else:
                assert charged == self.told

        self.run(check())


class PostgresGrantsMachine(GrantsMachine):
    store_kind = "postgres"


for _machine in (GrantsMachine, PostgresGrantsMachine):
    _machine.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
TestGrantsAgainstModel = GrantsMachine.TestCase
TestPostgresGrantsAgainstModel = PostgresGrantsMachine.TestCase
