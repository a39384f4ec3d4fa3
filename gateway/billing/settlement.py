"""Two-phase billing of proxied calls: hold before forwarding, capture or void after.

Owns the leases of this process's in-flight holds (renewed in the background), the sweeper that
voids lapsed holds of crashed processes, and settlement tasks that survive handler cancellation
(a client disconnect cancels the aiohttp handler; the capture/void must still run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway.billing.grants import GrantBook, GrantPolicy
from gateway.ids import TimeOrderedIds
from gateway.ledger.base import Charge, FreeCall, HoldOutcome, HoldRequest, HoldStatus
from gateway.ledger.interfaces import Billable

log = structlog.get_logger("gateway.billing.settlement")


class Billing:
    def __init__(
        self,
        ledger: Billable,
        *,
        owner: str,
        lease_s: float,
        sweep_interval_s: float,
        clock: Callable[[], float] = time.time,
        grants: GrantPolicy | None = None,
        grants_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.clock = clock  # unix seconds: what decides the UTC day of free allowances
        self.owner = owner
        self.lease_s = lease_s
        self.sweep_interval_s = sweep_interval_s
        self._inflight: set[str] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._progress = asyncio.Event()
        self.renewals = 0  # lease renewal rounds that renewed at least one hold
        self._renewed = asyncio.Event()
        self._ids = TimeOrderedIds()
        # Told of every capture this process makes (``payments``: balance alerts and auto-recharge);
        # must return at once (it only schedules work) and never raise into settlement.
        self.on_capture: Callable[[Charge], None] | None = None
        # Credit grants (``credit_grants: true``): calls of a key held and captured in memory.
        self.grants: GrantBook | None = None
        if grants is not None:
            self.grants = GrantBook(
                ledger,
                owner=owner,
                lease_s=lease_s,
                new_id=self.new_call_id,
                track=self._track,
                policy=grants,
                clock=grants_clock,
            )

    def new_call_id(self) -> str:
        """A fresh call id: time-ordered (``gateway.ids``), 80 random bits read 256 ids at a time."""
        return self._ids.next()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def today(self) -> str:
        """The UTC day free allowances are counted in, "YYYY-MM-DD"."""
        return datetime.fromtimestamp(self.clock(), UTC).strftime("%Y-%m-%d")

    async def claim_free(self, call: FreeCall) -> bool:
        """Record ``call`` against its free allowance; True when it is free (nothing is held then)."""
        try:
            return await self.ledger.claim_free_call(call)
        except BaseException:
            # The claim may or may not have committed; giving it back is safe either way.
            self.settle(call.call_id, capture=False, free=True)
            raise

    async def hold(self, req: HoldRequest) -> HoldOutcome:
        grants = self.grants
        if grants is not None and req.key_id is not None:
            taken = grants.take(req)  # out of a grant in memory: no await
            if taken is None:
                taken = await grants.hold(req)
            if taken is not None:
                self._inflight.add(req.call_id)
                self._idle.clear()
                return taken
        self._inflight.add(req.call_id)
        self._idle.clear()
        try:
            outcome = await self.ledger.hold(req)
            if grants is not None and outcome.status in (HoldStatus.INSUFFICIENT_FUNDS, HoldStatus.SPEND_LIMIT):
                outcome = await self._hold_after_grants(req, grants)
        except BaseException:
            # The hold may or may not have committed; voiding is safe either way.
            self.settle(req.call_id, capture=False)
            raise
        if not outcome.ok:
            self._forget(req.call_id)
        return outcome

    async def _hold_after_grants(self, req: HoldRequest, grants: GrantBook) -> HoldOutcome:
        """A per-call hold was refused while grants may hold the user's money: this process gives
        its grants of the user back, and the call waits (up to ``drain_wait_s``) for other processes'
        grants to come back, so the end of a balance stays exact (⌊B/p⌋) with grants on."""
        await grants.release_user(req.user)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grants.policy.drain_wait_s
        give_up = loop.time() + 3 * grants.policy.drain_wait_s  # however long grants keep moving
        seen: int | None = None
        while True:
            # Outstanding grants are read BEFORE the hold: a grant given back between the two is
            # then still seen as outstanding, and the call tries again instead of being refused.
            outstanding = await self.ledger.grants_outstanding(req.user)
            if outstanding != seen:  # grants are still coming back: wait longer (a busy ledger is slow)
                seen, deadline = outstanding, loop.time() + grants.policy.drain_wait_s
            outcome = await self.ledger.hold(req)
            if outcome.ok or not outstanding or loop.time() >= min(deadline, give_up):
                return outcome
            await asyncio.sleep(grants.policy.tick / 5)

    def settle(
        self, call_id: str, *, capture: bool, amount: int | None = None, free: bool = False
    ) -> asyncio.Task[None]:
        """Capture (``amount``, or all that is held when None) or void in a task of its own, so
        cancelling the caller cannot interrupt it. A ``free`` call holds nothing: its allowance is
        kept (capture) or given back. Await the returned task under ``asyncio.shield`` to wait for
        the outcome. A call held out of a credit grant is settled in memory; its task is the flush
        that writes it (a void's does nothing)."""
        grants = self.grants
        if grants is not None and not free and grants.owns(call_id):
            flush = grants.settle(call_id, capture=capture, amount=amount)
            self._forget(call_id)
            return flush if flush is not None else self._track(asyncio.get_running_loop().create_task(_nothing()))
        task = asyncio.get_running_loop().create_task(self._settle(call_id, capture, amount, free))
        self._settling.add(task)
        self._idle.clear()
        task.add_done_callback(self._settled)
        return task

    def _track(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Count ``task`` as settling until it is done (a grant's flush: drains wait for it)."""
        self._settling.add(task)
        self._idle.clear()
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        self._check_idle()

    async def _settle(self, call_id: str, capture: bool, amount: int | None, free: bool) -> None:
        try:
            if free:
                await self.ledger.settle_free_call(call_id, used=capture)
            elif capture and amount != 0:
                charge = await self.ledger.capture(call_id, amount)
                if self.on_capture is not None and not charge.replayed:
                    try:
                        self.on_capture(charge)
                    except Exception as exc:  # noqa: BLE001 - a watcher's failure never fails a capture
                        log.warning("on_capture_failed", call_id=call_id, error=f"{type(exc).__name__}: {exc}")
            else:  # voided, or a metered call that reported 0: nothing is charged
                await self.ledger.void(call_id)
        except Exception as exc:  # noqa: BLE001 - any store failure: logged, and the lease lapses
            # The hold stays pending; its lease lapses and the sweeper voids it: unbilled, never twice.
            log.error("settle_failed", call_id=call_id, capture=capture, error=str(exc), kind=type(exc).__name__)
        finally:
            self._forget(call_id)

    def _forget(self, call_id: str) -> None:
        self._inflight.discard(call_id)
        self._check_idle()

    def _check_idle(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()
        if not self._inflight and not self._settling:
            self._idle.set()

    @property
    def settling(self) -> int:
        return len(self._settling)

    async def wait_progress(self) -> None:
        """Wait until some hold is settled or forgotten."""
        await self._progress.wait()

    async def wait_settled(self) -> None:
        """Wait until every call this process held has been captured or voided."""
        await self._idle.wait()

    async def renew_forever(self) -> None:
        """Renew the leases of in-flight holds; with credit grants, also keep the grants (leases,
        read-backs, idle ones given back: ``GrantBook.maintain_forever``)."""
        grants = self.grants
        maintain = None if grants is None else asyncio.get_running_loop().create_task(grants.maintain_forever())
        interval = self.lease_s / 3
        try:
            while True:
                await asyncio.sleep(interval)
                held = [c for c in self._inflight if grants is None or not grants.owns(c)]
                if held:
                    try:
                        await self.ledger.renew(held, self.lease_s)
                    except Exception as exc:  # noqa: BLE001 - the renewer must outlive any store failure
                        log.error("lease_renew_failed", error=str(exc), holds=len(held))
                    else:
                        self.renewals += 1
                        self._renewed.set()
                        self._renewed = asyncio.Event()
        finally:
            if maintain is not None:
                maintain.cancel()

    async def close(self) -> None:
        """On drain, after ``wait_settled``: write what credit grants have queued and give every
        grant back (without grants, nothing to do)."""
        if self.grants is not None:
            await self.grants.close()

    async def wait_renewals(self, count: int) -> None:
        """Wait until ``count`` more lease renewal rounds have completed."""
        target = self.renewals + count
        while self.renewals < target:
            await self._renewed.wait()

    async def sweep_forever(self) -> None:
        while True:
            try:
                voided = await self.ledger.sweep()
                if voided:
                    log.warning("stale_holds_voided", count=voided)
            except Exception as exc:  # noqa: BLE001 - the sweeper must outlive any store failure
                log.error("sweep_failed", error=str(exc), kind=type(exc).__name__)
            await asyncio.sleep(self.sweep_interval_s)


def spawn(coro: Coroutine[Any, Any, None], tasks: set[asyncio.Task[None]]) -> asyncio.Task[None]:
    """create_task that keeps a reference (tasks can otherwise be garbage-collected mid-flight)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return task


async def _nothing() -> None:
    """The settle task of a call that needs no ledger write (a grant's void)."""
