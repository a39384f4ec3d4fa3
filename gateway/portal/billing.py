"""``/portal/billing``: card payments through Stripe (issue 16), a face over ``gateway.payments``.

A user adds to their balance ("Add to balance": ``POST /portal/topup``, field ``amount_cents``, answered
by a 303 to the Stripe Checkout page), sees their top-ups and their states (the success page says
"pending" until the webhook has credited it: the balance never moves on the browser's word), why the
balance is negative, and sets auto-recharge and a balance alert. A developer connects a Stripe
account (an onboarding link) and asks for a payout. Without ``payments.stripe`` the page says card
payments are off. Every POST checks the session's CSRF token.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.errors import InvalidInput, NotFound, PaymentsNotConfigured
from gateway.ledger.base import AccountKind
from gateway.logins.models import WebSession
from gateway.payments import Payments
from gateway.portal import security
from gateway.portal.render import page
from gateway.runtime import RUNTIME

# Where the page's forms lead after their 303 (Content-Security-Policy form-action covers redirects).
STRIPE_ORIGINS = "https://checkout.stripe.com https://connect.stripe.com"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/billing", billing_page)
    r.add_post("/topup", topup)
    r.add_get("/topup/success", topup_result)
    r.add_get("/topup/cancel", topup_result)
    r.add_post("/billing/recharge", save_recharge)
    r.add_post("/billing/alert", save_alert)
    r.add_get("/developer/connect", connect)  # Stripe's refresh_url: a new link
    r.add_post("/developer/connect", connect)
    r.add_post("/developer/payout", payout)


def _payments(request: web.Request) -> Payments | None:
    return request.config_dict[RUNTIME].payments


def _required(request: web.Request) -> Payments:
    payments = _payments(request)
    if payments is None:
        raise PaymentsNotConfigured("card payments are not set up on this gateway", hint="Ask the operator")
    return payments


def _user(ws: WebSession) -> str:
    if ws.login.user is None:
        raise NotFound("this login has no user account", hint="Ask the operator to link one")
    return ws.login.user


def _cents(form: dict[str, str], field: str, *, optional: bool = False) -> int | None:
    text = form.get(field, "").strip()
    if not text and optional:
        return None
    if not text.isdigit() or len(text) > 12:
        raise InvalidInput(f"{field.replace('_', ' ')} must be a whole number of cents, got {text!r}")
    return int(text)


async def billing_page(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    payments = _payments(request)
    rt = request.config_dict[RUNTIME]
    context: dict[str, Any] = {"payments": payments is not None, "done": request.query.get("done"), "user": None}
    if ws.login.user is not None:
        account = await rt.ledger.get_account(AccountKind.USER, ws.login.user)
        context.update(user=ws.login.user, available=account.available)
        if payments is not None:
            recharge = await payments.store.recharge(ws.login.user)
            alert = await payments.store.alert(ws.login.user)
            context.update(
                topups=await payments.store.topups(ws.login.user),
                notices=await payments.store.notices(ws.login.user),
                recharge=recharge,
                alert_threshold=alert[0] if alert else None,
                min_cents=payments.config.min_topup_cents,
                max_cents=payments.config.max_topup_cents,
                currency=payments.config.currency,
            )
    if ws.login.developer is not None and payments is not None:
        context["connected"] = await payments.store.account(ws.login.developer)
        context["developer"] = ws.login.developer
    if payments is not None:
        request[security.FORM_ACTIONS] = STRIPE_ORIGINS
    return await page(request, "billing.html", context, session=ws)


async def topup(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    form = await security.form_of(request)
    security.check_csrf(ws, form)
    payments = _required(request)
    cents = _cents(form, "amount_cents")
    assert cents is not None
    link = await payments.create_topup_link(_user(ws), cents)
    return web.Response(status=303, headers={"Location": link.url})


async def topup_result(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    payments = _required(request)
    topup_id = request.query.get("topup", "")
    found = await payments.store.topup(topup_id) if topup_id else None
    if found is None or found.user != ws.login.user:
        raise NotFound("you have no such top-up", hint="Open Billing to see your top-ups")
    cancelled = request.path.endswith("/cancel")
    return await page(request, "topup_result.html", {"topup": found, "cancelled": cancelled}, session=ws)


async def save_recharge(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    form = await security.form_of(request)
    security.check_csrf(ws, form)
    payments = _required(request)
    await payments.set_recharge(
        _user(ws),
        enabled=form.get("enabled") == "on",
        threshold_cents=_cents(form, "threshold_cents") or 0,
        amount_cents=_cents(form, "amount_cents") or 0,
        monthly_cap_cents=_cents(form, "monthly_cap_cents") or 0,
    )
    return security.see_other(request, "/portal/billing?done=recharge")


async def save_alert(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    form = await security.form_of(request)
    security.check_csrf(ws, form)
    await _required(request).set_alert(_user(ws), _cents(form, "threshold_cents", optional=True))
    return security.see_other(request, "/portal/billing?done=alert")


async def connect(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    if request.method == "POST":
        security.check_csrf(ws, await security.form_of(request))
    if ws.login.developer is None:
        raise NotFound("this login has no developer account", hint="Ask the operator to link one")
    link = await _required(request).connect(ws.login.developer)
    return web.Response(status=303, headers={"Location": link["url"]})


async def payout(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    security.check_csrf(ws, await security.form_of(request))
    if ws.login.developer is None:
        raise NotFound("this login has no developer account", hint="Ask the operator to link one")
    result = await _required(request).pay_out(ws.login.developer)
    return security.see_other(request, f"/portal/billing?done=payout-{result['state']}")
