"""What each Stripe event does, one handler per event type. Every handler is safe to run any number
of times, in any order, concurrently: money moves only through ledger operations whose references
deduplicate in the same transaction as the transfer, and the provider records change only by
conditional updates. The webhook and ``payments reconcile`` call the same ``apply_event``.

Event type                               → ledger
checkout.session.completed (paid)        topup  "stripe:checkout:<session>"   (the session's amount_total)
checkout.session.async_payment_succeeded topup  "stripe:checkout:<session>"
checkout.session.async_payment_failed    nothing (the top-up is failed)
checkout.session.expired                 nothing (the top-up is failed)
charge.refunded                          clawback "stripe:refund:<refund>" per refund (credit first if the
                                         top-up was never credited: out of order)
charge.refund.updated / refund.updated / refund.failed (status failed or canceled)
                                         topup "stripe:refund:<refund>:failed" (after the refund's own
                                         clawback, made if it never was: the pair sums to zero)
charge.dispute.funds_withdrawn           clawback "stripe:dispute:<dispute>:withdrawn"
charge.dispute.funds_reinstated          topup    "stripe:dispute:<dispute>:reinstated" (after the dispute's
                                         own withdrawal, made if it never was: the pair sums to zero)
payment_intent.succeeded (auto-recharge) topup    "stripe:payment_intent:<intent>"
payment_intent.payment_failed (recharge) nothing (auto-recharge paused; off after three)
account.updated                          nothing (payouts_enabled recorded)
transfer.reversed                        payout_reversal of the payout (or fail_payout while pending)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from gateway.errors import InvalidInput
from gateway.money import format_cents
from gateway.payments.core import cents_of, millis, object_id
from gateway.payments.payouts import PayoutsMixin
from gateway.payments.recharge import RechargeMixin
from gateway.payments.store import Topup
from gateway.payments.topups import Topups

log = structlog.get_logger("gateway.payments")

HANDLED_EVENTS: tuple[str, ...] = (
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "charge.refunded",
    "charge.refund.updated",
    "refund.updated",
    "refund.failed",
    "charge.dispute.funds_withdrawn",
    "charge.dispute.funds_reinstated",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "account.updated",
    "transfer.reversed",
)


class Handlers(Topups, RechargeMixin, PayoutsMixin):
    async def apply_event(self, event: dict[str, Any]) -> str:
        """Apply one event (already verified, or listed from Stripe's API); the outcome, for the log."""
        event_type = event.get("type")
        data = event.get("data")
        obj = data.get("object") if isinstance(data, dict) else None
        if not isinstance(event_type, str) or not isinstance(obj, dict):
            raise InvalidInput("the event has no type or no data.object")
        handler: dict[str, Callable[[dict[str, Any]], Awaitable[str]]] = {
            "checkout.session.completed": self._session_completed,
            "checkout.session.async_payment_succeeded": self._session_paid,
            "checkout.session.async_payment_failed": self._session_failed,
            "checkout.session.expired": self._session_failed,
            "charge.refunded": self._charge_refunded,
            "charge.refund.updated": self._refund_updated,
            "refund.updated": self._refund_updated,
            "refund.failed": self._refund_updated,
            "charge.dispute.funds_withdrawn": self._dispute_withdrawn,
            "charge.dispute.funds_reinstated": self._dispute_reinstated,
            "payment_intent.succeeded": self.recharge_succeeded,
            "payment_intent.payment_failed": self.recharge_payment_failed,
            "account.updated": self._account_updated,
            "transfer.reversed": self.transfer_reversed,
        }
        fn = handler.get(event_type)
        if fn is None:
            return "ignored"
        return await fn(obj)

    # --- checkout -------------------------------------------------------------------------------
    async def _session_topup(self, session: dict[str, Any]) -> Topup | None:
        reference = session.get("client_reference_id")
        session_id = session.get("id")
        if isinstance(reference, str):
            found = await self.store.topup(reference)
            # only the session made for that top-up (not another one naming it, e.g. a payment link)
            if found is not None and found.session_id in (None, session_id):
                return found
        return await self.store.topup_by(session_id=session_id) if isinstance(session_id, str) else None

    async def _session_completed(self, session: dict[str, Any]) -> str:
        if session.get("mode") != "payment":
            return "ignored"
        topup = await self._session_topup(session)
        if topup is None:
            return "unknown_session"
        if session.get("payment_status") != "paid":  # a delayed method: async_payment_succeeded credits it
            intent = object_id(session.get("payment_intent"))
            if intent is not None:
                await self.store.link_payment_intent(topup.id, intent)
            return "awaiting_payment"
        return await self._credit_session(topup, session)

    async def _session_paid(self, session: dict[str, Any]) -> str:
        topup = await self._session_topup(session)
        if topup is None:
            return "unknown_session"
        return await self._credit_session(topup, session)

    async def _session_failed(self, session: dict[str, Any]) -> str:
        topup = await self._session_topup(session)
        if topup is None:
            return "unknown_session"
        reason = "the payment failed" if session.get("status") != "expired" else "the checkout expired"
        changed = await self.store.set_state(topup.id, "failed", only_from=("created", "pending"), detail=reason)
        return "failed" if changed else "unchanged"

    async def _credit_session(self, topup: Topup, session: dict[str, Any]) -> str:
        amount = cents_of(session.get("amount_total"), "amount_total")
        currency = str(session.get("currency") or "").lower()
        if currency != self.config.currency:
            return await self._refuse_currency(topup, currency, amount)
        intent = object_id(session.get("payment_intent"))
        if intent is not None:
            await self.store.link_payment_intent(topup.id, intent)
        transfer = await self.ledger.topup(topup.user, millis(amount), reference=f"stripe:checkout:{session['id']}")
        await self.store.set_state(topup.id, "credited", only_from=("created", "pending"))
        if intent is not None and not transfer.replayed:
            await self.remember_card(topup.user, intent)
        await self.balance_changed(topup.user)
        return "replayed" if transfer.replayed else "credited"

    async def _refuse_currency(self, topup: Topup, currency: str, amount: int) -> str:
        detail = (
            f"paid {amount} in {currency or 'an unknown currency'}, but balances are kept in "
            f"{self.config.currency}: not credited (refund it at Stripe, or credit it by hand)"
        )
        log.warning("payments_currency_refused", topup=topup.id, currency=currency, expected=self.config.currency)
        if await self.store.set_state(topup.id, "failed", only_from=("created", "pending"), detail=detail):
            await self.notifier.notify(topup.user, "topup_refused", "Your AgentPay top-up was not credited", detail)
        return "refused_currency"

    async def _ensure_credited(self, topup: Topup, amount: int, intent: str | None) -> None:
        """A refund or dispute arrived for a top-up whose credit has not landed (events out of order):
        credit it first, with the very reference its own event will use, so that event replays it."""
        if topup.state not in ("created", "pending"):
            return
        if topup.kind == "checkout" and topup.session_id is not None:
            reference = f"stripe:checkout:{topup.session_id}"
        elif topup.kind == "recharge" and intent is not None:
            reference = f"stripe:payment_intent:{intent}"
        else:
            return
        await self.ledger.topup(topup.user, millis(amount), reference=reference)
        await self.store.set_state(topup.id, "credited", only_from=("created", "pending"))

    # --- refunds and disputes -------------------------------------------------------------------
    async def _charge_refunded(self, charge: dict[str, Any]) -> str:
        intent = object_id(charge.get("payment_intent"))
        topup = await self.topup_for_payment_intent(intent)
        if topup is None:
            return "unknown_charge"
        currency = str(charge.get("currency") or "").lower()
        if currency != self.config.currency:
            log.warning("payments_currency_refused", topup=topup.id, currency=currency, event="charge.refunded")
            return "refused_currency"
        await self._ensure_credited(topup, cents_of(charge.get("amount"), "amount"), intent)
        listed = charge.get("refunds")
        if isinstance(listed, dict) and isinstance(listed.get("data"), list) and not listed.get("has_more"):
            refunds = [r for r in listed["data"] if isinstance(r, dict)]
        else:
            refunds = await self.api.list_refunds(str(charge["id"]))
        taken = 0
        for refund in refunds:
            if refund.get("status") not in ("succeeded", "pending"):
                continue
            amount = cents_of(refund.get("amount"), "refund amount")
            if amount == 0:
                continue
            transfer = await self.ledger.clawback(topup.user, millis(amount), f"stripe:refund:{refund['id']}")
            if not transfer.replayed:
                taken += amount
        await self.store.note_refunded(topup.id, cents_of(charge.get("amount_refunded"), "amount_refunded"))
        if taken:
            await self.notifier.notify(
                topup.user,
                "refund",
                "A card payment to your AgentPay balance was refunded",
                f"A refund of {format_cents(millis(taken))} cents of your top-up {topup.id} was taken back from your "
                "AgentPay balance.",
            )
            await self.balance_changed(topup.user)
        return f"clawed_back {taken}" if taken else "replayed"

    async def _refund_updated(self, refund: dict[str, Any]) -> str:
        """A refund that failed or was canceled gives the money back to the user. Its clawback is made
        first if it never was (same reference: a replay otherwise), so the pair sums to zero in any order."""
        if refund.get("status") not in ("failed", "canceled"):
            return "ignored"
        intent = object_id(refund.get("payment_intent"))
        if intent is None and object_id(refund.get("charge")) is not None:
            intent = object_id(
                (await self.api.retrieve_charge(str(object_id(refund.get("charge"))))).get("payment_intent")
            )
        topup = await self.topup_for_payment_intent(intent)
        if topup is None:
            return "unknown_charge"
        if str(refund.get("currency") or "").lower() != self.config.currency:
            return "refused_currency"
        amount = millis(cents_of(refund.get("amount"), "refund amount"))
        if amount == 0:
            return "ignored"
        await self.ledger.clawback(topup.user, amount, f"stripe:refund:{refund['id']}")
        back = await self.ledger.topup(topup.user, amount, reference=f"stripe:refund:{refund['id']}:failed")
        if not back.replayed:
            await self.balance_changed(topup.user)
        return "replayed" if back.replayed else "refund_failed_returned"

    async def _dispute_topup(self, dispute: dict[str, Any]) -> tuple[Topup | None, str | None]:
        intent = object_id(dispute.get("payment_intent"))
        if intent is None and object_id(dispute.get("charge")) is not None:
            charge = await self.api.retrieve_charge(str(object_id(dispute.get("charge"))))
            intent = object_id(charge.get("payment_intent"))
        return await self.topup_for_payment_intent(intent), intent

    async def _dispute_withdrawn(self, dispute: dict[str, Any]) -> str:
        topup, intent = await self._dispute_topup(dispute)
        if topup is None:
            return "unknown_charge"
        currency = str(dispute.get("currency") or "").lower()
        if currency != self.config.currency:
            log.warning("payments_currency_refused", topup=topup.id, currency=currency, event="dispute")
            return "refused_currency"
        amount = cents_of(dispute.get("amount"), "dispute amount")
        if not await self._withdraw(topup, intent, dispute, amount):
            return "replayed"
        return "clawed_back"

    async def _withdraw(self, topup: Topup, intent: str | None, dispute: dict[str, Any], amount: int) -> bool:
        """The dispute's withdrawal (crediting the top-up first if its credit never landed); whether
        it was made now (False: made before)."""
        if topup.state in ("created", "pending"):
            charge_id = object_id(dispute.get("charge"))
            charge = await self.api.retrieve_charge(charge_id) if charge_id else {"amount": amount}
            await self._ensure_credited(topup, cents_of(charge.get("amount"), "amount"), intent)
        transfer = await self.ledger.clawback(topup.user, millis(amount), f"stripe:dispute:{dispute['id']}:withdrawn")
        if not transfer.replayed:
            await self.notifier.notify(
                topup.user,
                "dispute",
                "A card payment to your AgentPay balance is disputed",
                f"A payment of {format_cents(millis(amount))} cents (top-up {topup.id}) is disputed with your bank; "
                "its amount was taken back from your AgentPay balance until the dispute is settled.",
            )
            await self.balance_changed(topup.user)
        return not transfer.replayed

    async def _dispute_reinstated(self, dispute: dict[str, Any]) -> str:
        """The withdrawal is made first if it never was (same reference: a replay otherwise), so a
        reinstatement never credits money that was not taken: the pair sums to zero in any order."""
        topup, intent = await self._dispute_topup(dispute)
        if topup is None:
            return "unknown_charge"
        currency = str(dispute.get("currency") or "").lower()
        if currency != self.config.currency:
            return "refused_currency"
        amount = cents_of(dispute.get("amount"), "dispute amount")
        await self._withdraw(topup, intent, dispute, amount)
        transfer = await self.ledger.topup(
            topup.user, millis(amount), reference=f"stripe:dispute:{dispute['id']}:reinstated"
        )
        if not transfer.replayed:
            await self.balance_changed(topup.user)
        return "replayed" if transfer.replayed else "reinstated"

    # --- Connect --------------------------------------------------------------------------------
    async def _account_updated(self, account: dict[str, Any]) -> str:
        account_id = object_id(account)
        if account_id is None:
            return "ignored"
        enabled = account.get("payouts_enabled") is True
        known = await self.store.set_payouts_enabled(account_id, enabled)
        if not known:
            return "unknown_account"
        return "payouts_enabled" if enabled else "payouts_disabled"
