"""The calls AgentPay makes to Stripe, through the official ``stripe`` library's async client.

Every POST carries an ``Idempotency-Key`` derived from our own record (``topup:<id>``,
``payout:<id>``, …): a retry (the library's own after a network error, or ours after a crash)
returns Stripe's first answer instead of charging or paying twice. Answers come back as plain
dicts (Stripe's JSON), failures as ``PaymentProviderError`` (or ``CardFailure`` for a declined or
authentication-needing off-session payment). The secret key is never logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import stripe

from gateway.config_payments import StripeConfig
from gateway.errors import PaymentProviderError

# Stripe's API version the objects we read are shaped by (``checkout.session.amount_total``,
# ``dispute.payment_intent``, …). Pinned so an account's default version cannot change them.
API_VERSION = "2025-03-31.basil"


@dataclass(frozen=True, slots=True)
class CardFailure(Exception):
    """An off-session PaymentIntent that failed: ``code`` is Stripe's (``authentication_required``,
    ``card_declined``, …); ``payment_intent`` the intent Stripe created, if any."""

    code: str
    message: str
    payment_intent: str | None


class StripeApi:
    def __init__(self, config: StripeConfig) -> None:
        self._http = stripe.AIOHTTPClient(timeout=30)
        kwargs: dict[str, Any] = {"http_client": self._http, "max_network_retries": 2, "stripe_version": API_VERSION}
        if config.api_base is not None:
            kwargs["base_addresses"] = {"api": config.api_base, "connect": config.api_base}
        self._client = stripe.StripeClient(config.secret_key, **kwargs)
        self.currency = config.currency

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def _call(self, what: str, coro: Any) -> dict[str, Any]:
        try:
            result = await coro
        except stripe.CardError as exc:
            raise CardFailure(
                code=str(exc.code or "card_declined"),
                message=str(exc.user_message or exc),
                payment_intent=_intent_of(exc),
            ) from exc
        except (stripe.APIConnectionError, stripe.APIError) as exc:
            # No answer, or Stripe's own failure: the request may have been done. The same
            # Idempotency-Key makes a later retry safe; callers must not assume it failed.
            raise PaymentProviderError(
                f"Stripe could not be reached to {what} ({type(exc).__name__}); the outcome is unknown",
                data={"outcome_unknown": True},
            ) from exc
        except stripe.StripeError as exc:
            raise PaymentProviderError(f"Stripe refused to {what}: {exc.user_message or exc}") from exc
        return dict(result.to_dict())

    async def create_customer(self, user: str, *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(
            "create a customer",
            self._client.v1.customers.create_async(
                {"metadata": {"agentpay_user": user}}, {"idempotency_key": idempotency_key}
            ),
        )

    async def create_checkout_session(self, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(
            "create a Checkout Session",
            self._client.v1.checkout.sessions.create_async(params, {"idempotency_key": idempotency_key}),  # type: ignore[arg-type]
        )

    async def create_payment_intent(self, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(
            "create a PaymentIntent",
            self._client.v1.payment_intents.create_async(params, {"idempotency_key": idempotency_key}),  # type: ignore[arg-type]
        )

    async def retrieve_payment_intent(self, intent: str) -> dict[str, Any]:
        return await self._call("read a PaymentIntent", self._client.v1.payment_intents.retrieve_async(intent))

    async def retrieve_charge(self, charge: str) -> dict[str, Any]:
        return await self._call("read a charge", self._client.v1.charges.retrieve_async(charge))

    async def list_refunds(self, charge: str) -> list[dict[str, Any]]:
        page = await self._call("list refunds", self._client.v1.refunds.list_async({"charge": charge, "limit": 100}))
        return list(page.get("data") or [])

    async def create_account(self, developer: str, *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(
            "create a connected account",
            self._client.v1.accounts.create_async(
                {
                    "type": "express",
                    "capabilities": {"transfers": {"requested": True}},
                    "metadata": {"agentpay_developer": developer},
                },
                {"idempotency_key": idempotency_key},
            ),
        )

    async def create_account_link(
        self, account: str, *, refresh_url: str, return_url: str, idempotency_key: str
    ) -> dict[str, Any]:
        return await self._call(
            "create an onboarding link",
            self._client.v1.account_links.create_async(
                {
                    "account": account,
                    "type": "account_onboarding",
                    "refresh_url": refresh_url,
                    "return_url": return_url,
                },
                {"idempotency_key": idempotency_key},
            ),
        )

    async def create_transfer(self, params: dict[str, Any], *, idempotency_key: str) -> dict[str, Any]:
        return await self._call(
            "create a transfer",
            self._client.v1.transfers.create_async(params, {"idempotency_key": idempotency_key}),  # type: ignore[arg-type]
        )

    async def list_events(self, since: int) -> list[dict[str, Any]]:
        """Every event created at or after ``since`` (unix seconds), oldest first."""
        events: list[dict[str, Any]] = []
        params: dict[str, Any] = {"created": {"gte": since}, "limit": 100}
        while True:
            page = await self._call("list events", self._client.v1.events.list_async(params))  # type: ignore[arg-type]
            data = list(page.get("data") or [])
            events.extend(data)
            if not page.get("has_more") or not data:
                break
            params = {**params, "starting_after": data[-1]["id"]}
        events.sort(key=lambda e: (int(e.get("created") or 0), str(e.get("id"))))
        return events


def _intent_of(exc: stripe.CardError) -> str | None:
    error = exc.error
    intent = getattr(error, "payment_intent", None) if error is not None else None
    if isinstance(intent, dict):
        value = intent.get("id")
        return value if isinstance(value, str) else None
    value = getattr(intent, "id", None)
    return value if isinstance(value, str) else None
