"""``Payments``: the Stripe integration as one object the app, the portal and the CLI hold.

Built from ``payments.stripe`` (``build_payments``); ``None`` when it is not configured (the manual
rail, ``users topup`` / ``payouts settle``, is all there is then)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from gateway.config import GatewayConfig
from gateway.ledger.interfaces import Ledger
from gateway.payments.notify import Notifier
from gateway.payments.reconcile import RECONCILE_HANDLER, Reconciler
from gateway.payments.store import PaymentsStore
from gateway.payments.stripe_api import StripeApi

log = structlog.get_logger("gateway.payments")
WEBHOOK_HANDLER = "webhook"
__all__ = ["RECONCILE_HANDLER", "WEBHOOK_HANDLER", "Payments", "build_payments"]


class Payments(Reconciler):
    async def open(self) -> None:
        self.init_watch()
        await self.store.open()
        await self.refresh_thresholds()

    async def close(self) -> None:
        await self.cancel_checks()
        await self.api.close()
        await self.store.close()

    async def handle_webhook_event(self, event: dict[str, Any]) -> str:
        """Apply a verified event and log it (id, type, outcome)."""
        event_id, event_type = str(event.get("id")), str(event.get("type"))
        outcome = await self.apply_event(event)
        await self.store.log_event(WEBHOOK_HANDLER, event_id, event_type, outcome)
        log.info("payments_webhook", event_id=event_id, type=event_type, outcome=outcome)
        return outcome

    async def payout_schedule_forever(self) -> None:
        if self.schedule is None:
            return
        while True:
            await asyncio.sleep(self.schedule.interval_s)
            try:
                await self.pay_out_all()
            except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                log.warning("payments_payout_schedule_failed", error=f"{type(exc).__name__}: {exc}")


def build_payments(config: GatewayConfig, ledger: Ledger, *, clock: Callable[[], float] = time.time) -> Payments | None:
    stripe = config.payments.stripe
    if stripe is None:
        return None
    store = PaymentsStore.for_database(config.database, clock=clock)
    base = config.portal.base_url or f"{'https' if config.tls_cert else 'http'}://{config.listen}"
    return Payments(
        stripe,
        ledger=ledger,
        store=store,
        api=StripeApi(stripe),
        notifier=Notifier(store, config.smtp),
        base_url=base,
        schedule=config.payments.payout_schedule,
        clock=clock,
    )
