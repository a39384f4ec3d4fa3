"""The OAuth pages of the portal: the consent page (``/portal/oauth/consent``) and the list of
connected applications (``/portal/connections``), where a user revokes one.

``GET /oauth/authorize`` checks an authorization request and sends the browser here, where the
portal's session is (its cookie is scoped to ``/portal``). Signed out, the person signs in first
and comes back (``/portal/login?next=…``). The consent form posts to ``/oauth/authorize`` with a
``csrf_token`` that is a signed consent ticket (``gateway.oauth.consent``): it names this session,
this login, this user and exactly this request.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from aiohttp import web

from gateway.errors import Forbidden, NotFound
from gateway.oauth.consent import Consenter, request_params
from gateway.oauth.redirects import csp_source, is_loopback
from gateway.oauth.service import AuthorizePageError, AuthorizeRedirectError, OAuthService
from gateway.portal import security
from gateway.portal.keys import user_of
from gateway.portal.prices import listed_prices
from gateway.portal.render import page
from gateway.runtime import RUNTIME


def _oauth(request: web.Request) -> OAuthService:
    oauth = request.config_dict[RUNTIME].oauth
    if oauth is None:
        raise NotFound("OAuth is not enabled on this gateway", hint="Connect with an API key instead")
    return oauth


async def consent(request: web.Request) -> web.StreamResponse:
    oauth = _oauth(request)
    ws = await security.session_of(request)
    if ws is None:
        here = request.rel_url.path_qs
        raise security.redirect(request, "/portal/login?next=" + quote(here, safe=""))
    user = user_of(ws)
    params = request_params(dict(request.query))
    try:
        req = await oauth.check_request(params)
    except AuthorizePageError as exc:
        raise Forbidden(str(exc), hint="Go back to the application and connect again") from None
    except AuthorizeRedirectError as exc:
        raise web.HTTPFound(exc.location) from None
    rt = request.config_dict[RUNTIME]
    ticket = oauth.tickets.issue(Consenter(ws.id, ws.login.id, user), params, oauth.clock())
    target = urlsplit(req.redirect_uri)
    request[security.FORM_ACTIONS] = csp_source(req.redirect_uri)  # the answer redirects there
    return await page(
        request,
        "oauth_consent.html",
        {
            "req": req,
            "params": params,
            "csrf_token": ticket,
            "client_host": urlsplit(req.client.client_id).hostname if req.client.kind == "cimd" else None,
            "redirect_host": target.hostname or target.scheme + ":",
            "redirect_loopback": is_loopback(req.redirect_uri),
            "prices": listed_prices(rt.prices.table, req.server),
            "user": user,
        },
        session=ws,
    )


async def connections(request: web.Request) -> web.StreamResponse:
    oauth = _oauth(request)
    ws = await security.require_session(request)
    grants = await oauth.connected(user_of(ws)) if ws.login.user is not None else []
    return await page(request, "oauth_connections.html", {"grants": grants}, session=ws)


async def disconnect(request: web.Request) -> web.StreamResponse:
    oauth = _oauth(request)
    ws = await security.require_session(request)
    security.check_csrf(ws, await security.form_of(request))
    grant = await oauth.disconnect(user_of(ws), request.match_info["grant_id"])
    if grant is None:
        raise NotFound("no such connected application", hint="Reload the list of connected applications")
    raise security.redirect(request, "/portal/connections?done=revoked")


def add_routes(app: web.Application) -> None:
    """The routes, on the portal's sub-application."""
    app.router.add_get("/oauth/consent", consent)
    app.router.add_get("/connections", connections)
    app.router.add_post("/connections/{grant_id}/revoke", disconnect)
