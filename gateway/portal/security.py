"""The portal's defences, in one place: the session cookie, CSRF tokens on every form, and the
headers every portal response carries.

- Session: the cookie holds the login service's session token (stored hashed there); HttpOnly,
  SameSite=Lax, Path=/portal, Secure when ``portal.base_url`` is https. A new token on every sign-in.
- CSRF, signed in: each form carries the session's own ``csrf_token`` (compared in constant time).
- CSRF, signed out (sign-up, sign-in, reset, invite links): double submit. A random pre-session
  cookie (HttpOnly, SameSite=Strict) whose value the form repeats; a cross-site form can neither
  read the cookie nor make the browser send it.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway.errors import Forbidden
from gateway.logins.models import WebSession
from gateway.runtime import RUNTIME

SESSION_COOKIE = "agentpay_session"
CSRF_COOKIE = "agentpay_csrf"
COOKIE_PATH = "/portal"
CSRF_FIELD = "csrf_token"


@dataclass(frozen=True, slots=True)
class _Found:
    session: WebSession | None


_SESSION: web.RequestKey[_Found] = web.RequestKey("portal_session", _Found)  # this request's session
_FRESH_CSRF: web.RequestKey[str] = web.RequestKey("portal_fresh_csrf", str)  # a pre-session token to set as cookie

CSP = "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # invite and reset tokens are in URLs
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Cross-Origin-Opener-Policy": "same-origin",
}


def base_url(request: web.Request) -> str:
    """``portal.base_url`` without a trailing slash: every redirect and absolute link starts with it."""
    config = request.config_dict[RUNTIME].config
    return (config.portal.base_url or f"http://{config.listen}").rstrip("/")


def secure_cookies(request: web.Request) -> bool:
    return base_url(request).startswith("https://")


def redirect(request: web.Request, path: str) -> web.HTTPSeeOther:
    """A 303 to ``path`` (which starts with /portal) on ``portal.base_url``, to raise."""
    return web.HTTPSeeOther(base_url(request) + path)


def see_other(request: web.Request, path: str) -> web.Response:
    """A 303 to ``path`` on ``portal.base_url``, to return (cookies can be set on it)."""
    return web.Response(status=303, headers={"Location": base_url(request) + path})


async def session_of(request: web.Request) -> WebSession | None:
    """The signed-in session of this request, or None (no cookie, unknown, expired, disabled login)."""
    if _SESSION in request:
        return request[_SESSION].session
    token = request.cookies.get(SESSION_COOKIE)
    found = None
    if token:
        found = await request.config_dict[RUNTIME].logins.session(token)
    request[_SESSION] = _Found(found)
    return found


async def require_session(request: web.Request) -> WebSession:
    """The signed-in session, or a redirect to the sign-in page."""
    found = await session_of(request)
    if found is None:
        raise redirect(request, "/portal/login")
    return found


def set_session_cookie(request: web.Request, response: web.StreamResponse, token: str, max_age_s: int) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=max_age_s,
        path=COOKIE_PATH,
        httponly=True,
        samesite="Lax",
        secure=secure_cookies(request),
    )


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(SESSION_COOKIE, path=COOKIE_PATH)


def anonymous_csrf(request: web.Request) -> str:
    """The pre-session CSRF token for a signed-out form: the cookie's value, or a new one that the
    middleware sets as a cookie on the answer."""
    existing = request.cookies.get(CSRF_COOKIE)
    if existing and len(existing) >= 32:
        return existing
    if _FRESH_CSRF not in request:
        request[_FRESH_CSRF] = secrets.token_urlsafe(32)
    return request[_FRESH_CSRF]


def check_anonymous_csrf(request: web.Request, form: dict[str, str]) -> None:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not _same(cookie, form.get(CSRF_FIELD, "")):
        raise Forbidden(
            "this form's CSRF token is missing or does not match",
            hint="Reload the page and send the form again (cookies must be enabled)",
        )


async def check_link_csrf(request: web.Request, form: dict[str, str]) -> None:
    """A one-time link's or the reset page's form, which a signed-in person may open too (their page
    carries the session's token): that token, or the pre-session one."""
    ws = await session_of(request)
    if ws is None or not _same(ws.csrf_token, form.get(CSRF_FIELD, "")):
        check_anonymous_csrf(request, form)


def check_csrf(session: WebSession, form: dict[str, str]) -> None:
    if not _same(session.csrf_token, form.get(CSRF_FIELD, "")):
        raise Forbidden(
            "this form's CSRF token is missing or does not match your session",
            hint="Reload the page and send the form again",
        )


def _same(expected: str, given: str) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected.encode(), given.encode())


async def form_of(request: web.Request) -> dict[str, str]:
    """The posted form's text fields (the last value of a repeated field)."""
    data = await request.post()
    return {name: value for name, value in data.items() if isinstance(value, str)}


@web.middleware
async def headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every portal answer (errors and redirects included) carries the security headers; pages
    are never cached (they show balances, keys and CSRF tokens). Static files may be cached."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _decorate(request, exc)
        raise
    _decorate(request, response)
    return response


# Origins a page's forms may also lead to (a POST answered by a 303 to them): the pages with Stripe's
# "Add to balance" and Connect buttons set it (``portal.billing``); form-action applies to redirects.
FORM_ACTIONS: web.RequestKey[str] = web.RequestKey("portal_form_actions", str)


def _decorate(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(HEADERS)
    extra = request.get(FORM_ACTIONS)
    if extra:
        response.headers["Content-Security-Policy"] = CSP.replace("form-action 'self'", f"form-action 'self' {extra}")
    if not request.path.startswith("/portal/static/"):
        response.headers["Cache-Control"] = "no-store"
    fresh = request.get(_FRESH_CSRF)
    if fresh is not None:
        response.set_cookie(
            CSRF_COOKIE,
            fresh,
            path=COOKIE_PATH,
            httponly=True,
            samesite="Strict",
            secure=secure_cookies(request),
        )


def local_next(value: str | None) -> str | None:
    """``next`` (where to go after signing in) when it is a path of the portal, else None: never
    another site (``//evil.example``, ``/\\evil``, ``https://…``), so it cannot be an open redirect."""
    if not value or len(value) > 4000 or not value.startswith(COOKIE_PATH + "/"):
        return None
    if value.startswith("//") or "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        return None
    return value
