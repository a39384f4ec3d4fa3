"""A fake Stripe for the payment tests: a real aiohttp server on an ephemeral loopback port that the
real ``stripe`` library talks to (``payments.stripe.api_base``).

It serves the endpoints AgentPay calls (customers, Checkout Sessions, PaymentIntents, charges,
refunds, accounts and account links, transfers, the events list), honours ``Idempotency-Key`` as
Stripe does (the same key and parameters: the first answer again; the same key with other parameters:
400 ``idempotency_error``), and answers with objects built from Stripe's own published examples
(``fixtures/fixtures3.json``, from stripe/openapi, MIT: see ``fixtures/NOTICE``), with our fields set.

The tests drive what happens at Stripe through its methods (a customer pays, a refund, a dispute, a
transfer reversed), each of which records the event Stripe would send; ``deliver`` posts an event
to the gateway's webhook signed by the library's own ``WebhookSignature.generate_signature_header``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import stripe
from aiohttp import web
from aiohttp.test_utils import TestServer

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "fixtures3.json").read_text())["resources"]
WEBHOOK_SECRET = "whsec_test_fake_stripe_secret"
SECRET_KEY = "sk_test_fake_stripe_key"


def fixture(kind: str, **fields: Any) -> dict[str, Any]:
    """Stripe's example object of ``kind`` with ``fields`` set."""
    obj: dict[str, Any] = copy.deepcopy(FIXTURES[kind])
    obj.update(fields)
    return obj


def _nest(form: Mapping[str, str]) -> dict[str, Any]:
    """Stripe's form encoding (``a[b][0][c]=v``) as nested dicts (lists as dicts keyed "0", "1", …)."""
    out: dict[str, Any] = {}
    for key, value in form.items():
        parts = key.replace("]", "").split("[")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


@dataclass
class FakeStripe:
    """The fake's state; ``url`` once started."""

    server: TestServer | None = None
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    accounts: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, str | None, dict[str, Any]]] = field(
        default_factory=list
    )  # method, path, key, params
    failing_destinations: set[str] = field(default_factory=set)
    card_behaviour: dict[str, str] = field(default_factory=dict)  # payment method -> "ok" | decline code
    _idempotent: dict[str, tuple[str, int, Any]] = field(default_factory=dict)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))  # type: ignore[type-arg]
    now: float = field(default_factory=time.time)

    # --- server ---------------------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/customers", self._customers)
        app.router.add_post("/v1/checkout/sessions", self._create_session)
        app.router.add_post("/v1/payment_intents", self._create_intent)
        app.router.add_get("/v1/payment_intents/{id}", self._get("intents"))
        app.router.add_get("/v1/charges/{id}", self._get("charges"))
        app.router.add_get("/v1/refunds", self._list_refunds)
        app.router.add_post("/v1/accounts", self._create_account)
        app.router.add_post("/v1/account_links", self._account_link)
        app.router.add_post("/v1/transfers", self._create_transfer)
        app.router.add_get("/v1/events", self._list_events)
        self.server = TestServer(app, host="127.0.0.1", port=None)
        await self.server.start_server()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):06d}"

    async def _idempotent_post(self, request: web.Request, make: Any) -> web.Response:
        form = dict(await request.post())
        params = {k: str(v) for k, v in form.items()}
        key = request.headers.get("Idempotency-Key")
        self.requests.append((request.method, request.path, key, params))
        fingerprint = hashlib.sha256(json.dumps([request.path, params], sort_keys=True).encode()).hexdigest()
        if key is not None and key in self._idempotent:
            first_print, status, body = self._idempotent[key]
            if first_print != fingerprint:
                return web.json_response(
                    {
                        "error": {
                            "type": "idempotency_error",
                            "message": "Keys for idempotent requests can only be used with the same parameters "
                            "they were first used with.",
                        }
                    },
                    status=400,
                )
            return web.json_response(body, status=status, headers={"Idempotent-Replayed": "true"})
        status, body = make(_nest(params))
        if key is not None:
            self._idempotent[key] = (fingerprint, status, body)
        return web.json_response(body, status=status)

    def _get(self, table: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            found = getattr(self, table).get(request.match_info["id"])
            if found is None:
                return web.json_response(
                    {"error": {"type": "invalid_request_error", "message": "No such object"}}, status=404
                )
            return web.json_response(found)

        return handle

    # --- endpoints ------------------------------------------------------------------------------
    async def _customers(self, request: web.Request) -> web.Response:
        def make(p: dict[str, Any]) -> tuple[int, Any]:
            customer = fixture("customer", id=self.new_id("cus"), metadata=p.get("metadata", {}))
            self.customers[customer["id"]] = customer
            return 200, customer

        return await self._idempotent_post(request, make)

    async def _create_session(self, request: web.Request) -> web.Response:
        def make(p: dict[str, Any]) -> tuple[int, Any]:
            line = p["line_items"]["0"]
            amount = int(line["price_data"]["unit_amount"]) * int(line.get("quantity", "1"))
            session_id = self.new_id("cs_test")
            session = fixture(
                "checkout.session",
                id=session_id,
                mode=p["mode"],
                customer=p.get("customer"),
                client_reference_id=p.get("client_reference_id"),
                amount_total=amount,
                amount_subtotal=amount,
                currency=line["price_data"]["currency"],
                metadata=p.get("metadata", {}),
                payment_intent=None,
                payment_status="unpaid",
                status="open",
                success_url=p.get("success_url"),
                cancel_url=p.get("cancel_url"),
                url=f"https://checkout.stripe.com/c/pay/{session_id}",
            )
            session["_intent_data"] = p.get("payment_intent_data", {})
            self.sessions[session_id] = session
            return 200, {k: v for k, v in session.items() if not k.startswith("_")}

        return await self._idempotent_post(request, make)

    async def _create_intent(self, request: web.Request) -> web.Response:
        def make(p: dict[str, Any]) -> tuple[int, Any]:
            intent = fixture(
                "payment_intent",
                id=self.new_id("pi"),
                amount=int(p["amount"]),
                amount_received=0,
                currency=p["currency"],
                customer=p.get("customer"),
                payment_method=p.get("payment_method"),
                metadata=p.get("metadata", {}),
                last_payment_error=None,
                status="processing",
            )
            self.intents[intent["id"]] = intent
            behaviour = self.card_behaviour.get(str(p.get("payment_method")), "ok")
            if behaviour == "ok":
                intent["status"] = "succeeded"
                intent["amount_received"] = intent["amount"]
                self._charge_for(intent)
                self.record("payment_intent.succeeded", intent)
                return 200, intent
            intent["status"] = "requires_payment_method"
            error = {"type": "card_error", "code": behaviour, "message": f"The card failed: {behaviour}",
                     "payment_intent": intent}  # fmt: skip
            intent["last_payment_error"] = {k: v for k, v in error.items() if k != "payment_intent"}
            self.record("payment_intent.payment_failed", intent)
            return 402, {"error": error}

        return await self._idempotent_post(request, make)

    async def _list_refunds(self, request: web.Request) -> web.Response:
        charge = request.query.get("charge")
        data = [r for r in self.refunds.values() if r["charge"] == charge]
        return web.json_response({"object": "list", "data": data, "has_more": False, "url": "/v1/refunds"})

    async def _create_account(self, request: web.Request) -> web.Response:
        def make(p: dict[str, Any]) -> tuple[int, Any]:
            account = fixture(
                "account", id=self.new_id("acct"), type=p.get("type"), metadata=p.get("metadata", {}),
                payouts_enabled=False,
            )  # fmt: skip
            self.accounts[account["id"]] = account
            return 200, account

        return await self._idempotent_post(request, make)

    async def _account_link(self, request: web.Request) -> web.Response:
        def make(p: dict[str, Any]) -> tuple[int, Any]:
            if p.get("account") not in self.accounts:
                return 400, {"error": {"type": "invalid_request_error", "message": "No such account"}}
            return 200, fixture(
                "account_link", url=f"https://connect.stripe.com/setup/e/{p['account']}/{self.new_id('link')}",
                expires_at=int(self.now) + 300,
            )  # fmt: skip

        return await self._idempotent_post(request, make)

    async def _create_transfer(self, request: web.Request) -> web.Response:
        def make(p: dict[str, Any]) -> tuple[int, Any]:
            destination = p.get("destination")
            if destination in self.failing_destinations or destination not in self.accounts:
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "balance_insufficient",
                        "message": "You have insufficient available funds in your Stripe account.",
                    }
                }
            transfer = fixture(
                "transfer",
                id=self.new_id("tr"),
                amount=int(p["amount"]),
                amount_reversed=0,
                currency=p["currency"],
                destination=destination,
                transfer_group=p.get("transfer_group"),
                metadata=p.get("metadata", {}),
                reversed=False,
            )
            self.transfers[transfer["id"]] = transfer
            self.record("transfer.created", transfer)
            return 200, transfer

        return await self._idempotent_post(request, make)

    async def _list_events(self, request: web.Request) -> web.Response:
        gte = int(request.query.get("created[gte]", "0"))
        data = [e for e in reversed(self.events) if e["created"] >= gte]  # newest first, like Stripe
        limit = int(request.query.get("limit", "10"))
        after = request.query.get("starting_after")
        if after is not None:
            ids = [e["id"] for e in data]
            data = data[ids.index(after) + 1 :]
        return web.json_response(
            {"object": "list", "data": data[:limit], "has_more": len(data) > limit, "url": "/v1/events"}
        )

    # --- what happens at Stripe (test drivers) --------------------------------------------------
    def record(self, event_type: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """The event Stripe would send for ``obj`` (shaped like the fixture's), kept for /v1/events."""
        event = fixture(
            "event",
            id=self.new_id("evt"),
            type=event_type,
            created=int(self.now),
            api_version="2025-03-31.basil",
            data={"object": copy.deepcopy({k: v for k, v in obj.items() if not k.startswith("_")})},
            pending_webhooks=1,
        )
        self.events.append(event)
        return event

    def _charge_for(self, intent: dict[str, Any]) -> dict[str, Any]:
        charge = fixture(
            "charge",
            id=self.new_id("ch"),
            amount=intent["amount"],
            amount_captured=intent["amount"],
            amount_refunded=0,
            currency=intent["currency"],
            customer=intent.get("customer"),
            payment_intent=intent["id"],
            paid=True,
            captured=True,
            refunded=False,
            status="succeeded",
        )
        charge["refunds"] = {
            "object": "list",
            "data": [],
            "has_more": False,
            "url": f"/v1/charges/{charge['id']}/refunds",
        }
        self.charges[charge["id"]] = charge
        intent["latest_charge"] = charge["id"]
        return charge

    def pay_session(self, session_id: str, *, currency: str | None = None, card: str = "pm_card_visa",
                    delayed: bool = False) -> dict[str, Any]:  # fmt: skip
        """The customer pays: the session completes (``checkout.session.completed``, paid unless
        ``delayed``); returns the event. ``currency`` pretends it was paid in another one."""
        session = self.sessions[session_id]
        if currency is not None:
            session["currency"] = currency
        intent_data = session.get("_intent_data", {})
        intent = fixture(
            "payment_intent",
            id=self.new_id("pi"),
            amount=session["amount_total"],
            amount_received=session["amount_total"],
            currency=session["currency"],
            customer=session["customer"],
            payment_method=card,
            setup_future_usage=intent_data.get("setup_future_usage"),
            metadata=intent_data.get("metadata", {}),
            last_payment_error=None,
            status="processing" if delayed else "succeeded",
        )
        self.intents[intent["id"]] = intent
        session.update(status="complete", payment_intent=intent["id"], payment_status="unpaid" if delayed else "paid")
        if not delayed:
            self._charge_for(intent)
        return self.record("checkout.session.completed", session)

    def async_payment(self, session_id: str, *, succeeded: bool) -> dict[str, Any]:
        session = self.sessions[session_id]
        intent = self.intents[session["payment_intent"]]
        if succeeded:
            intent["status"] = "succeeded"
            self._charge_for(intent)
            session["payment_status"] = "paid"
            return self.record("checkout.session.async_payment_succeeded", session)
        return self.record("checkout.session.async_payment_failed", session)

    def charge_of_session(self, session_id: str) -> dict[str, Any]:
        intent = self.intents[self.sessions[session_id]["payment_intent"]]
        return self.charges[intent["latest_charge"]]

    def refund(self, charge_id: str, amount: int, *, status: str = "succeeded") -> dict[str, Any]:
        charge = self.charges[charge_id]
        refund = fixture(
            "refund", id=self.new_id("re"), amount=amount, charge=charge_id, currency=charge["currency"],
            payment_intent=charge["payment_intent"], status=status,
        )  # fmt: skip
        self.refunds[refund["id"]] = refund
        charge["amount_refunded"] += amount
        charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
        charge["refunds"]["data"].insert(0, refund)
        return self.record("charge.refunded", charge)

    def fail_refund(self, refund_id: str) -> dict[str, Any]:
        """A pending refund that failed: the money stays with the merchant (``charge.refund.updated``)."""
        refund = self.refunds[refund_id]
        refund["status"] = "failed"
        charge = self.charges[refund["charge"]]
        charge["amount_refunded"] -= refund["amount"]
        return self.record("charge.refund.updated", refund)

    def dispute(self, charge_id: str, event_type: str, dispute_id: str | None = None) -> dict[str, Any]:
        charge = self.charges[charge_id]
        dispute = fixture(
            "dispute", id=dispute_id or self.new_id("dp"), amount=charge["amount"], charge=charge_id,
            currency=charge["currency"], payment_intent=charge["payment_intent"],
            status="lost" if event_type.endswith("withdrawn") else "won",
        )  # fmt: skip
        return self.record(f"charge.dispute.{event_type}", dispute)

    def enable_payouts(self, account_id: str) -> dict[str, Any]:
        account = self.accounts[account_id]
        account.update(payouts_enabled=True, charges_enabled=True, details_submitted=True)
        return self.record("account.updated", account)

    def reverse_transfer(self, transfer_id: str) -> dict[str, Any]:
        transfer = self.transfers[transfer_id]
        transfer.update(reversed=True, amount_reversed=transfer["amount"])
        return self.record("transfer.reversed", transfer)

    # --- delivery -------------------------------------------------------------------------------
    @staticmethod
    def signed(
        event: Mapping[str, Any], *, secret: str = WEBHOOK_SECRET, timestamp: int | None = None
    ) -> tuple[str, str]:
        """(body, Stripe-Signature header) signed by the library's own helper."""
        body = json.dumps(event)
        ts = int(time.time()) if timestamp is None else timestamp
        return body, stripe.WebhookSignature.generate_signature_header(body, secret, ts)

    @staticmethod
    async def deliver(
        webhook_url: str,
        event: Mapping[str, Any],
        *,
        secret: str = WEBHOOK_SECRET,
        timestamp: int | None = None,
        header: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> tuple[int, dict[str, Any]]:
        body, signature = FakeStripe.signed(event, secret=secret, timestamp=timestamp)
        headers = {"Content-Type": "application/json", "Stripe-Signature": header if header is not None else signature}
        own = session is None
        client = session or aiohttp.ClientSession()
        try:
            async with client.post(webhook_url, data=body.encode(), headers=headers) as response:
                return response.status, await response.json(content_type=None)
        finally:
            if own:
                await client.close()
