"""``/portal/``: a user's balance (held, available), spend per day for 30 days, spend by server and
tool (``Operations.usage``: the same rows as ``agentpay usage``), recent charges with their receipt
ids, and the CSV export of every charge."""

from __future__ import annotations

import time
from collections import defaultdict

from aiohttp import web

from gateway.money import format_cents, parse_cents
from gateway.portal import security
from gateway.portal.charts import bar_chart, charges_since, first_day, per_day
from gateway.portal.exports import all_charges, charges_csv
from gateway.portal.keys import operations, user_of
from gateway.portal.render import page
from gateway.runtime import RUNTIME

RECENT = 20


async def dashboard(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    if ws.login.user is None:
        if ws.login.developer is not None:
            raise security.redirect(request, "/portal/developer")
        return await page(request, "no_account.html", session=ws)
    user = ws.login.user
    rt = request.config_dict[RUNTIME]
    ops = operations(request)
    shown = await ops.show_user(user)
    now = time.time()
    charges = await charges_since(rt.ledger, first_day(now), user=user)
    chart = bar_chart(per_day(charges, now, lambda c: c.amount))
    usage = await ops.usage(user=user)
    by_server: dict[str, int] = defaultdict(int)
    for row in usage:
        by_server[row["server"]] += parse_cents(row["amount_cents"])
    recent = await rt.ledger.list_charges(user=user, limit=RECENT)
    return await page(
        request,
        "dashboard.html",
        {
            "account": shown,
            "chart": chart,
            "usage": usage,
            "by_server": sorted((server, format_cents(total)) for server, total in by_server.items()),
            "recent": recent,
        },
        session=ws,
    )


async def charges_export(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    user = user_of(ws)
    body = charges_csv(await all_charges(request.config_dict[RUNTIME].ledger, user))
    return web.Response(
        text=body,
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": 'attachment; filename="agentpay-charges.csv"'},
    )
