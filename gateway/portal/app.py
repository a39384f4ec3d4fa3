"""The portal's wiring: a sub-application mounted at ``/portal/`` on the gateway listener, its
routes, templates (Jinja2, autoescaped) and static files (our own CSS and a copy-button script; no
asset from elsewhere)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from gateway.api.operations import iso
from gateway.config import GatewayConfig
from gateway.errors import GatewayError
from gateway.money import format_cents
from gateway.portal import auth, billing, catalog, dashboard, developer, keys, oauth, security
from gateway.portal.listing import Listings
from gateway.portal.render import page

PREFIX = "/portal"
_HERE = Path(__file__).parent


@web.middleware
async def error_pages(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A GatewayError raised by a page is an HTML page with its status, message and hint."""
    try:
        return await handler(request)
    except GatewayError as exc:
        headers = {}
        retry = getattr(exc, "retry_after_s", None)
        if isinstance(retry, int):
            headers["Retry-After"] = str(retry)
        return await page(request, "error.html", {"error": exc}, status=exc.http_status, headers=headers)


def _when(ts: float | None) -> str:
    """Unix seconds as "2026-12-03 14:05:09" (UTC), or an em dash."""
    text = iso(ts)
    return "—" if text is None else text.replace("T", " ").removesuffix("+00:00")


def portal_app(config: GatewayConfig) -> web.Application:
    app = web.Application(middlewares=[security.headers, error_pages])
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        filters={"cents": format_cents, "when": _when},
    )
    app[catalog.LISTINGS] = Listings(config)
    app.cleanup_ctx.append(_listings)
    r = app.router
    r.add_get("/", dashboard.dashboard)
    r.add_get("/charges.csv", dashboard.charges_export)
    r.add_get("/signup", auth.signup_form)
    r.add_post("/signup", auth.signup)
    r.add_get("/login", auth.login_form)
    r.add_post("/login", auth.login)
    r.add_post("/logout", auth.logout)
    r.add_get("/link/{token}", auth.link_form)
    r.add_post("/link/{token}", auth.link)
    r.add_get("/reset", auth.reset_form)
    r.add_post("/reset", auth.reset)
    r.add_get("/account", auth.account)
    r.add_post("/account/password", auth.change_password)
    r.add_post("/account/sessions/close", auth.sign_out_everywhere)
    r.add_get("/servers", catalog.catalog)
    r.add_get("/keys", keys.keys_page)
    r.add_post("/keys", keys.create_key)
    r.add_post("/keys/{key_id}/revoke", keys.revoke_key)
    r.add_get("/developer", developer.developer_page)
    r.add_post("/developer/charges/{charge_id}/refund", developer.refund)
    r.add_post("/developer/tokens", developer.create_token)
    r.add_post("/developer/tokens/{token_id}/revoke", developer.revoke_token)
    oauth.add_routes(app)  # /oauth/consent and /connections (issue 17)
    billing.add_routes(app)  # /billing, /topup, Stripe Connect (issue 16)
    r.add_static("/static/", _HERE / "static", append_version=False)
    r.add_route("*", "/{tail:.*}", _not_found)
    return app


async def _not_found(request: web.Request) -> web.StreamResponse:
    return await page(request, "not_found.html", status=404)


async def _listings(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[catalog.LISTINGS].close()


async def _to_portal(request: web.Request) -> web.StreamResponse:
    return security.see_other(request, PREFIX + "/")


def add_portal(app: web.Application, config: GatewayConfig) -> None:
    """Mount the portal on the gateway application (before its catch-all proxy route)."""
    app.router.add_get("/", _to_portal)
    app.router.add_get(PREFIX, _to_portal)
    app.add_subapp(PREFIX + "/", portal_app(config))
