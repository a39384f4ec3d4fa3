"""Auto-recharge and balance alerts, both checked when a capture leaves a user's available balance
under a threshold (``on_capture``, from ``billing.settlement``; the check runs in a task of its own,
never on the request's path), and after credits (to re-arm an alert).

Auto-recharge: one off-session PaymentIntent on the saved card (``confirm``, ``off_session``,
Idempotency-Key per attempt), credited only by ``payment_intent.succeeded``. At most one attempt in
flight per user, enforced in the database (``PaymentsStore.claim_recharge``); a monthly cap; a decline
or ``authentication_required`` pauses it and tells the user; three failures in a row switch it off.
Saving the settings again lifts a pause.

Balance alerts: one notice (and e-mail) per crossing below the threshold: the alert is disarmed in
the database when it fires (one winner among replicas) and re-armed once a credit lifts the balance
back to the threshold or above.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway.errors import InvalidInput, PaymentProviderError
from gateway.ledger.base import AccountKind, Charge
from gateway.money import format_cents
from gateway.payments.core import PaymentsCore, cents_of, millis, object_id
from gateway.payments.store import Topup
from gateway.payments.stripe_api import CardFailure

log = structlog.get_logger("gateway.payments")
MAX_FAILURES = 3
REFRESH_S = 30.0  # how often each process re-reads which users have thresholds
STUCK_S = 3600.0  # an attempt claimed but never sent to Stripe for this long is released


def month_start(now: float) -> float:
    day = datetime.fromtimestamp(now, UTC)
    return datetime(day.year, day.month, 1, tzinfo=UTC).timestamp()


class RechargeMixin(PaymentsCore):
    _thresholds: dict[str, int]  # user -> highest threshold (millicents) of their alert / auto-recharge
    _checks: dict[str, asyncio.Task[None]]

    def init_watch(self) -> None:
        self._thresholds = {}
        self._checks = {}

    async def refresh_thresholds(self) -> None:
        recharge = await self.store.recharge_users()
        alerts = await self.store.alert_users()
        merged: dict[str, int] = {}
        for user, cents in [*recharge.items(), *alerts.items()]:
            merged[user] = max(merged.get(user, -1), millis(cents))
        self._thresholds = merged

    async def refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh_thresholds()
            except Exception as exc:  # noqa: BLE001 - the database is down: keep the last map, retry
                log.warning("payments_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(REFRESH_S)

    def on_capture(self, charge: Charge) -> None:
        """Called by billing after each capture: a dictionary lookup; the check runs in its own task."""
        threshold = self._thresholds.get(charge.user)
        if threshold is None or charge.balance_after >= threshold or charge.user in self._checks:
            return
        task = asyncio.get_running_loop().create_task(self._check(charge.user))
        self._checks[charge.user] = task
        task.add_done_callback(lambda _: self._checks.pop(charge.user, None))

    async def wait_checks(self) -> None:
        """Wait for the balance checks started so far (tests, shutdown)."""
        while self._checks:
            await asyncio.gather(*list(self._checks.values()), return_exceptions=True)

    async def cancel_checks(self) -> None:
        for task in list(self._checks.values()):
            task.cancel()
        await self.wait_checks()

    async def _check(self, user: str) -> None:
        try:
            await self.check_balance(user)
        except Exception as exc:  # noqa: BLE001 - logged; the next capture checks again
            log.warning("payments_balance_check_failed", user=user, error=f"{type(exc).__name__}: {exc}")

    async def check_balance(self, user: str) -> str:
        """Fire the balance alert and start an auto-recharge if the available balance is under their
        thresholds; the auto-recharge outcome."""
        available = (await self.ledger.get_account(AccountKind.USER, user)).available
        alert = await self.store.alert(user)
        if alert is not None and available < millis(alert[0]) and await self.store.fire_alert(user):
            await self.notifier.notify(
                user,
                "balance_alert",
                "Your AgentPay balance is low",
                f"Your available AgentPay balance is {format_cents(available)} cents, under the "
                f"{alert[0]} cents you asked to be told about.",
            )
        return await self.maybe_recharge(user, available)

    async def balance_changed(self, user: str) -> None:
        """After a credit: re-arm a fired alert once the balance is back at its threshold."""
        alert = await self.store.alert(user)
        if alert is None or alert[1]:
            return
        available = (await self.ledger.get_account(AccountKind.USER, user)).available
        if available >= millis(alert[0]):
            await self.store.rearm_alert(user)

    async def remember_card(self, user: str, intent: str) -> None:
        """Keep the card of a checkout made with ``setup_future_usage`` for auto-recharge."""
        settings = await self.store.recharge(user)
        if settings is None or not settings.enabled:
            return
        details = await self.api.retrieve_payment_intent(intent)
        method = object_id(details.get("payment_method"))
        if method is not None and details.get("setup_future_usage") == "off_session":
            await self.store.save_payment_method(user, method)

    async def set_recharge(
        self, user: str, *, enabled: bool, threshold_cents: int, amount_cents: int, monthly_cap_cents: int
    ) -> None:
        low, high = self.config.min_topup_cents, self.config.max_topup_cents
        if enabled and not low <= amount_cents <= high:
            raise InvalidInput(f"an auto-recharge amount must be from {low} to {high} cents, got {amount_cents}")
        if threshold_cents < 0 or monthly_cap_cents < 0:
            raise InvalidInput("the threshold and the monthly cap must be 0 or more cents")
        await self.ledger.get_account(AccountKind.USER, user)
        await self.store.set_recharge(
            user,
            enabled=enabled,
            threshold_cents=threshold_cents,
            amount_cents=max(amount_cents, 1),
            monthly_cap_cents=monthly_cap_cents,
        )
        await self.refresh_thresholds()

    async def set_alert(self, user: str, threshold_cents: int | None) -> None:
        if threshold_cents is not None and threshold_cents < 0:
            raise InvalidInput("a balance alert threshold must be 0 or more cents")
        await self.ledger.get_account(AccountKind.USER, user)
        await self.store.set_alert(user, threshold_cents)
        await self.refresh_thresholds()

    async def maybe_recharge(self, user: str, available: int) -> str:
        settings = await self.store.recharge(user)
        if settings is None or not settings.enabled or settings.paused_reason is not None:
            return "off"
        if available >= millis(settings.threshold_cents):
            return "above_threshold"
        if settings.inflight is not None:
            # In flight, unless its claim is an hour old and Stripe was never asked (the top-up never
            # left "created", or its row was never written: a process stopped in between).
            stuck = await self.store.topup(settings.inflight)
            if settings.updated_at > self.clock() - STUCK_S or (stuck is not None and stuck.state != "created"):
                return "in_flight"
            await self.store.finish_recharge(user, settings.inflight, failed=None)
            await self.store.set_state(
                settings.inflight, "failed", only_from=("created",), detail="interrupted before Stripe was asked"
            )
            log.warning("payments_recharge_claim_released", user=user, topup=settings.inflight)
            return "released"
        customer = await self.store.customer(user)
        if customer is None or customer[1] is None:
            return "no_saved_card"
        topup_id = "tu_" + uuid.uuid4().hex
        if not await self.store.claim_recharge(user, topup_id):
            return "in_flight"  # another capture (or replica) started one
        spent = await self.store.recharged_this_month(user, month_start(self.clock()))
        if spent + settings.amount_cents > settings.monthly_cap_cents:
            await self.store.finish_recharge(user, topup_id, failed=None)  # releases the claim
            return "monthly_cap"
        await self.store.create_topup(topup_id, user, "recharge", settings.amount_cents, self.config.currency)
        metadata = {"agentpay_topup": topup_id, "agentpay_user": user, "agentpay_kind": "recharge"}
        try:
            intent = await self.api.create_payment_intent(
                {
                    "amount": settings.amount_cents,
                    "currency": self.config.currency,
                    "customer": customer[0],
                    "payment_method": customer[1],
                    "confirm": True,
                    "off_session": True,
                    "metadata": metadata,
                },
                idempotency_key=f"recharge:{topup_id}",
            )
        except CardFailure as failure:
            if failure.payment_intent is not None:
                await self.store.link_payment_intent(topup_id, failure.payment_intent)
            topup = await self.store.topup(topup_id)
            assert topup is not None
            await self.recharge_failed(topup, failure.code)
            return failure.code
        except PaymentProviderError as exc:
            topup = await self.store.topup(topup_id)
            assert topup is not None
            await self.recharge_failed(topup, "provider_error", str(exc.message))
            return "provider_error"
        await self.store.link_payment_intent(topup_id, str(intent["id"]))
        await self.store.set_state(topup_id, "pending", only_from=("created",))
        log.info("payments_recharge_started", user=user, topup=topup_id, status=intent.get("status"))
        return "started"

    async def recharge_failed(self, topup: Topup, code: str, message: str | None = None) -> str:
        await self.store.set_state(topup.id, "failed", only_from=("created", "pending"), detail=code)
        outcome = await self.store.finish_recharge(topup.user, topup.id, failed=code, max_failures=MAX_FAILURES)
        if outcome == "stale":
            return outcome
        if code == "authentication_required":
            why = "your bank asks you to confirm payments with this card, which cannot be done while you are away"
        else:
            why = f"the card was declined ({code}{': ' + message if message else ''})"
        state = "switched off after three failures" if outcome == "disabled" else "paused"
        await self.notifier.notify(
            topup.user,
            "auto_recharge",
            f"AgentPay auto-recharge {state}",
            f"Auto-recharge of {topup.amount_cents} cents could not be charged: {why}. Auto-recharge is {state}. "
            "Add to your balance from the portal (the card is confirmed there), then save your auto-recharge "
            "settings again to resume it.",
        )
        return outcome

    async def recharge_succeeded(self, intent: dict[str, Any]) -> str:
        topup = await self._recharge_topup(intent)
        if topup is None:
            return "ignored"  # a checkout's intent: its session's event credits it
        currency = str(intent.get("currency") or "").lower()
        if currency != self.config.currency:
            log.warning("payments_currency_refused", topup=topup.id, currency=currency, event="payment_intent")
            return "refused_currency"
        amount = intent.get("amount_received") or intent.get("amount")
        transfer = await self.ledger.topup(
            topup.user, millis(cents_of(amount, "amount_received")), reference=f"stripe:payment_intent:{intent['id']}"
        )
        await self.store.set_state(topup.id, "credited", only_from=("created", "pending"))
        await self.store.finish_recharge(topup.user, topup.id, failed=None)
        await self.balance_changed(topup.user)
        return "replayed" if transfer.replayed else "credited"

    async def recharge_payment_failed(self, intent: dict[str, Any]) -> str:
        topup = await self._recharge_topup(intent)
        if topup is None:
            return "ignored"
        error = intent.get("last_payment_error")
        code = "card_declined"
        if isinstance(error, dict):
            code = str(error.get("code") or error.get("decline_code") or code)
        return await self.recharge_failed(topup, code)

    async def _recharge_topup(self, intent: dict[str, Any]) -> Topup | None:
        metadata = intent.get("metadata") if isinstance(intent.get("metadata"), dict) else {}
        topup_id = metadata.get("agentpay_topup") if metadata else None
        topup = await self.store.topup(topup_id) if isinstance(topup_id, str) else None
        if topup is None and isinstance(intent.get("id"), str):
            topup = await self.store.topup_by(payment_intent=intent["id"])
        if topup is None or topup.kind != "recharge" or not isinstance(intent.get("id"), str):
            return None
        if topup.payment_intent is None:
            await self.store.link_payment_intent(topup.id, intent["id"])  # only when it has none yet
            topup = await self.store.topup(topup.id)
        # One top-up, one PaymentIntent: another intent naming this top-up in its metadata (one we
        # never created) credits nothing, or the top-up would be credited once per such intent.
        if topup is None or topup.payment_intent != intent["id"]:
            log.warning("payments_intent_not_ours", intent=intent["id"], topup=topup_id)
            return None
        return topup
