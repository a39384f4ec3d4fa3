"""Top-ups by card: a Checkout Session per top-up (``users topup-link``, the portal's "Add to
balance"), and the Stripe Customer each user gets once."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidInput
from gateway.ledger.base import AccountKind
from gateway.payments.core import PaymentsCore


@dataclass(frozen=True, slots=True)
class TopupLink:
    topup_id: str
    session_id: str
    url: str

    def to_json(self) -> dict[str, Any]:
        return {"topup_id": self.topup_id, "session_id": self.session_id, "url": self.url}


class Topups(PaymentsCore):
    async def ensure_customer(self, user: str) -> str:
        """The user's Stripe Customer, created once (the Idempotency-Key makes two concurrent first
        top-ups create one customer; the first recorded wins)."""
        found = await self.store.customer(user)
        if found is not None:
            return found[0]
        customer = await self.api.create_customer(user, idempotency_key=f"customer:{user}")
        return await self.store.remember_customer(user, str(customer["id"]))

    async def create_topup_link(self, user: str, cents: int) -> TopupLink:
        """A Checkout Session for ``cents`` (within min/max_topup_cents); nothing is credited until
        its webhook lands."""
        low, high = self.config.min_topup_cents, self.config.max_topup_cents
        if isinstance(cents, bool) or not isinstance(cents, int) or not low <= cents <= high:
            raise InvalidInput(f"a top-up must be a whole number of cents from {low} to {high}, got {cents!r}")
        await self.ledger.get_account(AccountKind.USER, user)  # NotFound for an unknown user
        topup_id = "tu_" + uuid.uuid4().hex
        await self.store.create_topup(topup_id, user, "checkout", cents, self.config.currency)
        customer = await self.ensure_customer(user)
        recharge = await self.store.recharge(user)
        metadata = {"agentpay_topup": topup_id, "agentpay_user": user}
        intent_data: dict[str, Any] = {"metadata": metadata}
        if recharge is not None and recharge.enabled:
            intent_data["setup_future_usage"] = "off_session"  # the card is saved for auto-recharge
        params: dict[str, Any] = {
            "mode": "payment",
            "customer": customer,
            "client_reference_id": topup_id,
            "line_items": [
                {
                    "quantity": 1,
                    "price_data": {
                        "currency": self.config.currency,
                        "unit_amount": cents,
                        "product_data": {"name": "AgentPay balance top-up"},
                    },
                }
            ],
            "metadata": metadata,
            "payment_intent_data": intent_data,
            "success_url": f"{self.base_url}/portal/topup/success?topup={topup_id}",
            "cancel_url": f"{self.base_url}/portal/topup/cancel?topup={topup_id}",
        }
        session = await self.api.create_checkout_session(params, idempotency_key=f"topup:{topup_id}")
        session_id, url = str(session["id"]), str(session.get("url") or "")
        await self.store.session_created(topup_id, session_id, url)
        return TopupLink(topup_id, session_id, url)
