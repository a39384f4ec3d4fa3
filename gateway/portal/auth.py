"""Signing up, in and out, one-time links (invite, reset, verify), and password resets.

The same answer for an unknown e-mail and a wrong password (the login service raises one
``BadCredentials`` for both); throttled sign-ins are 429 with Retry-After; every sign-in (form or
link) starts a new session token (no session fixation)."""

from __future__ import annotations

import time

from aiohttp import web

from gateway.errors import BadCredentials, EmailTaken, LinkInvalid, LoginError, Throttled, Unverified
from gateway.logins.models import Login
from gateway.portal import security
from gateway.portal.render import client_address, page
from gateway.runtime import RUNTIME

WRONG_CREDENTIALS = "That e-mail address and password do not match an account."


async def _signed_in(request: web.Request, login: Login, to: str = "/portal/") -> web.StreamResponse:
    """Start a new session for ``login`` (any session this browser had is closed first)."""
    logins = request.config_dict[RUNTIME].logins
    old = request.cookies.get(security.SESSION_COOKIE)
    if old:
        await logins.close_session(old)
    token, ws = await logins.open_session(login)
    response = security.see_other(request, to)
    security.set_session_cookie(request, response, token, max(int(ws.expires_at - time.time()), 1))
    return response


async def signup_form(request: web.Request) -> web.StreamResponse:
    if await security.session_of(request) is not None:
        raise security.redirect(request, "/portal/")
    return await page(request, "signup.html", {"email": ""})


async def signup(request: web.Request) -> web.StreamResponse:
    form = await security.form_of(request)
    security.check_anonymous_csrf(request, form)
    logins = request.config_dict[RUNTIME].logins
    email = form.get("email", "").strip()
    try:
        login = await logins.signup(email, form.get("password", ""))
    except EmailTaken:
        message = "This address cannot sign up again: if it is yours, sign in or reset its password."
        return await page(request, "signup.html", {"email": email, "error": message}, status=409)
    except LoginError as exc:
        return await page(request, "signup.html", {"email": email, "error": exc.text()}, status=exc.http_status)
    if not login.verified:
        return await page(request, "notice.html", {"title": "Check your e-mail", "email": login.email})
    return await _signed_in(request, login)


async def login_form(request: web.Request) -> web.StreamResponse:
    next_path = security.local_next(request.query.get("next"))  # e.g. back to an OAuth consent page
    if await security.session_of(request) is not None:
        raise security.redirect(request, next_path or "/portal/")
    return await page(request, "login.html", {"email": "", "next": next_path or ""})


async def login(request: web.Request) -> web.StreamResponse:
    form = await security.form_of(request)
    security.check_anonymous_csrf(request, form)
    logins = request.config_dict[RUNTIME].logins
    email = form.get("email", "").strip()
    next_path = security.local_next(form.get("next"))
    try:
        found = await logins.authenticate(email, form.get("password", ""), client=client_address(request))
    except BadCredentials:
        context = {"email": email, "error": WRONG_CREDENTIALS, "next": next_path or ""}
        return await page(request, "login.html", context, status=401)
    except Throttled as exc:
        wait = max(int(exc.retry_after_s), 1)
        message = f"Too many attempts to sign in. Try again in {wait} seconds."
        context = {"email": email, "error": message, "next": next_path or ""}
        return await page(request, "login.html", context, status=429, headers={"Retry-After": str(wait)})
    except Unverified as exc:
        message = f"Confirm your e-mail address first: open the link we sent to {email}. {exc.hint}."
        return await page(
            request, "login.html", {"email": email, "error": message, "next": next_path or ""}, status=403
        )
    return await _signed_in(request, found, next_path or "/portal/")


async def logout(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    security.check_csrf(ws, await security.form_of(request))
    token = request.cookies.get(security.SESSION_COOKIE, "")
    await request.config_dict[RUNTIME].logins.close_session(token)
    response = security.see_other(request, "/portal/login")
    security.clear_session_cookie(response)
    return response


async def link_form(request: web.Request) -> web.StreamResponse:
    link = await request.config_dict[RUNTIME].logins.peek_link(request.match_info["token"])
    if link is None:
        return await page(request, "link_invalid.html", status=404)
    return await page(request, "link.html", {"link": link})


async def link(request: web.Request) -> web.StreamResponse:
    form = await security.form_of(request)
    await security.check_link_csrf(request, form)
    logins = request.config_dict[RUNTIME].logins
    token = request.match_info["token"]
    shown = await logins.peek_link(token)
    if shown is None:
        return await page(request, "link_invalid.html", status=404)
    password = None if shown.purpose == "verify" else form.get("password", "")
    try:
        found = await logins.redeem_link(token, password)
    except LinkInvalid:
        return await page(request, "link_invalid.html", status=404)
    except LoginError as exc:
        return await page(request, "link.html", {"link": shown, "error": exc.text()}, status=exc.http_status)
    return await _signed_in(request, found)


async def reset_form(request: web.Request) -> web.StreamResponse:
    return await page(request, "reset.html", {"sent": False})


async def reset(request: web.Request) -> web.StreamResponse:
    """The same page whether the address has a login or not."""
    form = await security.form_of(request)
    await security.check_link_csrf(request, form)
    await request.config_dict[RUNTIME].logins.request_reset(form.get("email", "").strip())
    return await page(request, "reset.html", {"sent": True})


async def account(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    return await page(request, "account.html", {"done": request.query.get("done")}, session=ws)


async def change_password(request: web.Request) -> web.StreamResponse:
    """Every session of the login is closed by the change; this browser gets a new one."""
    ws = await security.require_session(request)
    form = await security.form_of(request)
    security.check_csrf(ws, form)
    logins = request.config_dict[RUNTIME].logins
    try:
        await logins.change_password(ws.login.id, form.get("current_password", ""), form.get("new_password", ""))
    except BadCredentials:
        error = "The current password is wrong."
        return await page(request, "account.html", {"error": error}, status=401, session=ws)
    except LoginError as exc:
        return await page(request, "account.html", {"error": exc.text()}, status=exc.http_status, session=ws)
    return await _signed_in(request, ws.login, "/portal/account?done=password")


async def sign_out_everywhere(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    security.check_csrf(ws, await security.form_of(request))
    await request.config_dict[RUNTIME].logins.close_all_sessions(ws.login.id)
    response = security.see_other(request, "/portal/login")
    security.clear_session_cookie(response)
    return response
