"""The authorization server's HTTP endpoints on the gateway listener.

``/.well-known/oauth-authorization-server`` and ``/.well-known/openid-configuration`` (the issuer's
metadata), ``/.well-known/oauth-protected-resource[/<server>/mcp]`` (each server's), ``POST
/oauth/register`` (RFC 7591), ``GET /oauth/authorize`` (checks the request, then the portal's consent
page, which signs the person in first), ``POST /oauth/authorize`` (the consent form: ``csrf_token``,
``decision=approve|deny``, optional ``spend_limit_cents``), ``POST /oauth/token`` and ``POST
/oauth/revoke`` (RFC 7009). Errors of the JSON endpoints have RFC 6749's shape; errors shown to a
person are a small HTML page. Metadata, registration, token and revocation answer CORS.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web

from gateway import addresses
from gateway.errors import GatewayError, OAuthError, Unavailable
from gateway.money import AmountError, parse_cents
from gateway.oauth import metadata
from gateway.oauth.clients import read_limited
from gateway.oauth.consent import request_params
from gateway.oauth.service import AuthorizePageError, AuthorizeRedirectError, OAuthService
from gateway.proxy.limits import TooManyRequests
from gateway.proxy.routing import host_name
from gateway.runtime import RUNTIME

CONSENT_PATH = "/portal/oauth/consent"
_MAX_REGISTRATION_BYTES = 16 * 1024
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, MCP-Protocol-Version",
    "Access-Control-Max-Age": "86400",
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def oauth_of(request: web.Request) -> OAuthService:
    oauth = request.config_dict[RUNTIME].oauth
    if oauth is None:  # routes are only added when oauth is enabled
        raise web.HTTPNotFound()
    return oauth


def add_routes(app: web.Application) -> None:
    """The endpoints, on the main application (before the proxy's catch-all route)."""
    r = app.router
    for path, handler in (
        ("/.well-known/oauth-authorization-server", as_metadata),
        ("/.well-known/openid-configuration", as_metadata),
        ("/.well-known/oauth-protected-resource{tail:(/.*)?}", resource_metadata),
    ):
        r.add_get(path, _cors(handler))
        r.add_route("OPTIONS", path, _preflight)
    for path, handler in (
        (metadata.REGISTER_PATH, register),
        (metadata.TOKEN_PATH, token),
        (metadata.REVOKE_PATH, revoke),
    ):
        r.add_post(path, _cors(handler))
        r.add_route("OPTIONS", path, _preflight)
    r.add_get(metadata.AUTHORIZE_PATH, authorize)
    r.add_post(metadata.AUTHORIZE_PATH, consent_post)


async def _preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=_CORS)


def _cors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except OAuthError as exc:
            response = oauth_error(exc)
        except GatewayError as exc:
            response = web.json_response(
                {
                    "error": "temporarily_unavailable" if isinstance(exc, Unavailable) else "server_error",
                    "error_description": exc.text(),
                },
                status=exc.http_status if exc.http_status >= 400 else 500,
            )
        response.headers.update(_CORS)
        return response

    return wrapped


def oauth_error(exc: OAuthError) -> web.Response:
    headers = dict(_NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="agentpay-oauth"'
    return web.json_response({"error": exc.error, "error_description": exc.text()}, status=exc.status, headers=headers)


# --- metadata -----------------------------------------------------------------------------------
async def as_metadata(request: web.Request) -> web.Response:
    return web.json_response(metadata.authorization_server(oauth_of(request).issuer))


async def resource_metadata(request: web.Request) -> web.Response:
    oauth = oauth_of(request)
    rt = request.config_dict[RUNTIME]
    tail = request.match_info.get("tail", "")
    origin = metadata.public_origin(request, rt.config)
    host = host_name(request.headers.get("Host"))
    host_server = rt.hosts.get(host) if host else None
    resource = origin + (tail or "/mcp")
    server = oauth.server_for(resource)
    if server is None or (not tail and host_server is None):
        return web.json_response(
            {"error": "not_found", "message": f"No MCP server is served at {tail or '/'}; use /<server>/mcp"},
            status=404,
        )
    return web.json_response(metadata.protected_resource(resource, oauth.issuer, server))


# --- registration -------------------------------------------------------------------------------
def client_address(request: web.Request) -> str:
    """The caller's address (``gateway.addresses``)."""
    proxies = request.config_dict[RUNTIME].config.trusted_proxies
    return addresses.client_address(request.remote, request.headers.get("X-Forwarded-For"), proxies)


async def register(request: web.Request) -> web.Response:
    oauth = oauth_of(request)
    address = client_address(request)
    try:  # unauthenticated writes: at most REGISTRATION_BURST at once, then one a second, per address
        oauth.registrations.acquire(address)
        oauth.registrations.release(address)  # only the rate counts, not calls in flight
    except TooManyRequests as exc:
        return web.json_response(
            {"error": "too_many_requests", "error_description": "Too many registrations from this address"},
            status=429,
            headers={"Retry-After": str(exc.retry_after_s), **_NO_STORE},
        )
    body = await read_limited(request.content, _MAX_REGISTRATION_BYTES)
    if body is None:
        raise OAuthError(
            "invalid_client_metadata", f"the registration request is larger than {_MAX_REGISTRATION_BYTES} bytes"
        )
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise OAuthError("invalid_client_metadata", "the registration request is not JSON") from None
    client, secret = await oauth.register(doc)
    answer: dict[str, Any] = {
        "client_id": client.client_id,
        "client_id_issued_at": int(client.created_at),
        "redirect_uris": list(client.redirect_uris),
        "token_endpoint_auth_method": client.auth_method,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    if client.client_name is not None:
        answer["client_name"] = client.client_name
    if client.client_uri is not None:
        answer["client_uri"] = client.client_uri
    if isinstance(doc, dict) and isinstance(doc.get("scope"), str):
        answer["scope"] = oauth.granted_scope(doc["scope"])
    if secret is not None:
        answer["client_secret"] = secret
        answer["client_secret_expires_at"] = 0
    return web.json_response(answer, status=201, headers=_NO_STORE)


# --- token and revocation -----------------------------------------------------------------------
async def _form(request: web.Request) -> dict[str, str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise OAuthError("invalid_request", "send the parameters as application/x-www-form-urlencoded")
    data = await request.post()
    return {name: value for name, value in data.items() if isinstance(value, str)}


def _basic(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "the Basic credentials are malformed", status=401) from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise OAuthError("invalid_client", "the Basic credentials are malformed", status=401)
    return unquote_plus(client_id), unquote_plus(secret)  # RFC 6749 §2.3.1: form-urlencoded


async def token(request: web.Request) -> web.Response:
    oauth = oauth_of(request)
    answer = await oauth.token(await _form(request), _basic(request))
    return web.json_response(answer, headers=_NO_STORE)


async def revoke(request: web.Request) -> web.Response:
    oauth = oauth_of(request)
    await oauth.revoke_token(await _form(request), _basic(request))
    return web.Response(status=200, headers=_NO_STORE)


# --- authorization ------------------------------------------------------------------------------
def problem_page(message: str, *, status: int, hint: str = "") -> web.Response:
    """A page for the person at the browser when the request cannot be sent back to the client."""
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Cannot connect · AgentPay</title>"
        "<style>body{font:16px system-ui,sans-serif;max-width:40em;margin:3em auto;padding:0 1em}</style>"
        f"</head><body><h1>This connection cannot go on</h1><p data-testid=oauth-error>{html.escape(message)}</p>"
        + (f"<p>{html.escape(hint)}</p>" if hint else "")
        + "</body></html>"
    )
    return web.Response(text=body, status=status, content_type="text/html", headers=_PAGE_HEADERS)


async def authorize(request: web.Request) -> web.StreamResponse:
    """Check the request, then send the browser to the consent page (in the portal, where the
    person's session is; it signs them in first). A request refused with a redirect to the client goes
    there too: the error redirect waits until the person has signed in (RFC 9700 §4.11.2), so a link
    to our issuer never bounces a stranger straight to a redirect URI anyone could register."""
    oauth = oauth_of(request)
    params = {k: v for k, v in request.query.items()}
    try:
        await oauth.check_request(params)
    except AuthorizePageError as exc:
        return problem_page(str(exc), status=400)
    except AuthorizeRedirectError:
        pass  # the consent page redirects with the error once the person is signed in
    raise web.HTTPSeeOther(f"{portal_base(request)}{CONSENT_PATH}?{request.query_string}")


async def consent_post(request: web.Request) -> web.StreamResponse:
    """The consent form: approve (with an optional spend limit in cents) or deny."""
    oauth = oauth_of(request)
    data = await request.post()
    form = {name: value for name, value in data.items() if isinstance(value, str)}
    params = request_params(form)
    who = oauth.tickets.check(form.get("csrf_token", ""), params, oauth.clock())
    logins = request.config_dict[RUNTIME].logins
    if who is None or not await logins.session_live(who.session_id, who.login_id):  # signed out since
        return problem_page(
            "This consent form's CSRF token is missing, expired or not for this request, or you signed out",
            status=403,
            hint="Go back to the application and connect again",
        )
    try:
        req = await oauth.check_request(params)
    except AuthorizePageError as exc:
        return problem_page(str(exc), status=400)
    except AuthorizeRedirectError as exc:
        raise web.HTTPSeeOther(exc.location) from None
    decision = form.get("decision")
    if decision == "deny":
        raise web.HTTPSeeOther(oauth.deny(req))
    if decision != "approve":
        return problem_page("decision must be approve or deny", status=400)
    limit_text = form.get("spend_limit_cents", "").strip()
    spend_limit = None
    if limit_text:
        try:
            spend_limit = parse_cents(limit_text)
        except AmountError as exc:
            return problem_page(f"Spend limit: {exc}", status=400, hint="Go back and enter an amount such as 500")
    location = await oauth.approve(req, user=who.user, login_id=who.login_id, spend_limit=spend_limit)
    raise web.HTTPSeeOther(location)


def portal_base(request: web.Request) -> str:
    """``portal.base_url`` (the consent page is in the portal) without its trailing slash."""
    config = request.config_dict[RUNTIME].config
    base = config.portal.base_url or f"{'https' if config.tls_cert else 'http'}://{config.listen}"
    return base.rstrip("/")
