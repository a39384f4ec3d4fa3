"""Two-phase billing of proxied calls: hold before forwarding, capture or void after.

Owns the leases of this process's in-flight holds (renewed in the background), the sweeper that
voids lapsed holds of crashed processes, and settlement tasks that survive handler cancellation
(a client disconnect cancels the aiohttp handler; the capture/void must still run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from gateway.ids import TimeOrderedIds
from gateway.ledger.base import HoldOutcome, HoldRequest
from gateway.ledger.interfaces import Holds

log = structlog.get_logger("gateway.billing.settlement")


class Billing:
    def __init__(self, ledger: Holds, *, owner: str, lease_s: float, sweep_interval_s: float) -> None:
        self.ledger = ledger
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

    def new_call_id(self) -> str:
        """A fresh call id: time-ordered (``gateway.ids``), 80 random bits read 256 ids at a time."""
        return self._ids.next()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def hold(self, req: HoldRequest) -> HoldOutcome:
        self._inflight.add(req.call_id)
        self._idle.clear()
        try:
            outcome = await self.ledger.hold(req)
        except BaseException:
            # The hold may or may not have committed; voiding is safe either way.
            self.settle(req.call_id, capture=False)
            raise
        if not outcome.ok:
            self._forget(req.call_id)
        return outcome

    def settle(self, call_id: str, *, capture: bool) -> asyncio.Task[None]:
        """Capture or void in a task of its own, so cancelling the caller cannot interrupt it.
        Await the returned task under ``asyncio.shield`` to wait for the outcome."""
        task = asyncio.get_running_loop().create_task(self._settle(call_id, capture))
        self._settling.add(task)
        self._idle.clear()
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        self._check_idle()

    async def _settle(self, call_id: str, capture: bool) -> None:
        try:
            if capture:
                await self.ledger.capture(call_id)
            else:
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
        interval = self.lease_s / 3
        while True:
            await asyncio.sleep(interval)
            if self._inflight:
                try:
                    await self.ledger.renew(list(self._inflight), self.lease_s)
                except Exception as exc:  # noqa: BLE001 - the renewer must outlive any store failure
                    log.error("lease_renew_failed", error=str(exc), holds=len(self._inflight))
                else:
                    self.renewals += 1
                    self._renewed.set()
                    self._renewed = asyncio.Event()

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
