"""``/portal/developer``: a developer's earnings (per day and per tool), their charges with a refund
action, service tokens (created once-shown, revoked) and payouts. Only for a login linked to a
developer account; a developer acts only on their own charges and tokens (anything else is 404).
Refunds are the ledger's ``refund`` (what ``agentpay charges refund`` and the service API run),
keyed in the developer's idempotency namespace so a form sent twice refunds once."""

from __future__ import annotations

import secrets
import time

from aiohttp import web

from gateway.api.operations import amount
from gateway.errors import InvalidInput, NotFound
from gateway.ledger.base import Charge, developer_reference
from gateway.logins.models import WebSession
from gateway.portal import security
from gateway.portal.charts import bar_chart, charges_since, first_day, per_day
from gateway.portal.keys import operations
from gateway.portal.render import page
from gateway.runtime import RUNTIME

RECENT = 50


def developer_of(ws: WebSession) -> str:
    if ws.login.developer is None:
        raise NotFound(
            "this login has no developer account",
            hint="Ask the operator to link one (agentpay logins invite EMAIL --developer NAME)",
        )
    return ws.login.developer


def credited(charge: Charge) -> int:
    """What a charge credited the developer when it was captured (the amount less the platform fee)."""
    return charge.amount - charge.fee


async def developer_page(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    dev = developer_of(ws)
    rt = request.config_dict[RUNTIME]
    ops = operations(request)
    now = time.time()
    recent = await charges_since(rt.ledger, first_day(now), developer=dev)
    return await page(
        request,
        "developer.html",
        {
            "developer": dev,
            "earnings": await ops.earnings(dev),
            "chart": bar_chart(per_day(recent, now, credited)),
            "breakdown": await rt.ledger.earnings_breakdown(dev),
            "charges": await rt.ledger.list_charges(developer=dev, limit=RECENT),
            "tokens": list(reversed(await ops.list_tokens(dev))),
            "payouts": list(reversed(await ops.list_payouts(dev))),
            "owned": sorted(name for name, srv in rt.config.servers.items() if srv.owner == dev),
            "refund_key": secrets.token_urlsafe(16),
            "done": request.query.get("done"),
            "error": request.query.get("error"),
        },
        session=ws,
    )


async def refund(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    form = await security.form_of(request)
    security.check_csrf(ws, form)
    dev = developer_of(ws)
    rt = request.config_dict[RUNTIME]
    charge_id = request.match_info["charge_id"]
    try:
        charge: Charge | None = await rt.ledger.get_charge(charge_id)
    except NotFound:
        charge = None
    if charge is None or charge.developer != dev:
        raise NotFound(f"you have no charge {charge_id!r}", hint="Pick a charge from your list of charges")
    text = form.get("amount_cents", "").strip()
    value = amount(text, "refund amount") if text else None
    key = form.get("idempotency_key", "").strip()[:100]
    reference = developer_reference(dev, "portal:" + key) if key else None
    await rt.ledger.refund(charge.id, value, reference=reference)
    return security.see_other(request, "/portal/developer?done=refunded")


async def create_token(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    data = await request.post()
    form = {k: v for k, v in data.items() if isinstance(v, str)}
    security.check_csrf(ws, form)
    dev = developer_of(ws)
    servers = [v for v in data.getall("server", []) if isinstance(v, str)]
    if not servers:
        raise InvalidInput("a service token needs at least one server", hint="Tick the servers it may charge for")
    created = await operations(request).create_token(developer=dev, servers=servers)
    return await page(request, "token_created.html", {"created": created}, session=ws)


async def revoke_token(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    security.check_csrf(ws, await security.form_of(request))
    dev = developer_of(ws)
    token_id = request.match_info["token_id"]
    ops = operations(request)
    if token_id not in {t["id"] for t in await ops.list_tokens(dev)}:
        raise NotFound(f"you have no service token {token_id!r}", hint="Pick a token from your list")
    await ops.revoke_token(token_id)
    return security.see_other(request, "/portal/developer?done=token-revoked")
