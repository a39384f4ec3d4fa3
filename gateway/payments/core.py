"""``PaymentsCore``: what every part of the Stripe integration shares (the config, the ledger, the
provider records, the Stripe client, the notifier, the clock), and the conversions between Stripe's
amounts (the currency's minor unit: cents) and the ledger's (millicents)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gateway.config_payments import PayoutSchedule, StripeConfig
from gateway.errors import InvalidInput
from gateway.ledger.interfaces import Ledger
from gateway.money import MILLIS_PER_CENT
from gateway.payments.notify import Notifier
from gateway.payments.store import PaymentsStore, Topup
from gateway.payments.stripe_api import StripeApi


def millis(cents: int) -> int:
    return cents * MILLIS_PER_CENT


def cents_of(value: Any, what: str) -> int:
    """A Stripe amount (a non-negative integer), or InvalidInput."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"the event's {what} is not an amount in cents: {value!r}")
    return value


def object_id(value: Any) -> str | None:
    """An id Stripe sends either as a string or as an expanded object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


class PaymentsCore:
    def __init__(
        self,
        config: StripeConfig,
        *,
        ledger: Ledger,
        store: PaymentsStore,
        api: StripeApi,
        notifier: Notifier,
        base_url: str,
        schedule: PayoutSchedule | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.store = store
        self.api = api
        self.notifier = notifier
        self.base_url = base_url.rstrip("/")
        self.schedule = schedule
        self.clock = clock

    async def topup_for_payment_intent(self, intent: str | None) -> Topup | None:
        """Our top-up behind a PaymentIntent: by the id we recorded, else by the intent's metadata
        (a Checkout Session's intent is only learnt from its completion, which may not have arrived)."""
        if intent is None:
            return None
        found = await self.store.topup_by(payment_intent=intent)
        if found is not None:
            return found
        details = await self.api.retrieve_payment_intent(intent)
        topup_id = (details.get("metadata") or {}).get("agentpay_topup")
        if not isinstance(topup_id, str):
            return None
        topup = await self.store.topup(topup_id)
        if topup is None:
            return None
        await self.store.link_payment_intent(topup.id, intent)  # only when it has none yet
        topup = await self.store.topup(topup.id)
        # One top-up, one PaymentIntent: another intent naming it (made elsewhere on the account, or a
        # copy of its metadata) is not ours, and its refunds or disputes take nothing from this user.
        return topup if topup is not None and topup.payment_intent == intent else None
