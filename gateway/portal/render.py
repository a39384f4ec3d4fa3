"""Rendering a portal page: the template, the signed-in session (for the menu and the forms' CSRF
token) and the status. Jinja2 autoescapes every value (``app.portal_app`` turns it on)."""

from __future__ import annotations

from typing import Any

import aiohttp_jinja2
from aiohttp import web

from gateway import addresses
from gateway.logins.models import WebSession
from gateway.portal import security
from gateway.runtime import RUNTIME


async def page(
    request: web.Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status: int = 200,
    session: WebSession | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """``template`` rendered; signed-out pages get the pre-session CSRF token instead of the session's."""
    rt = request.config_dict[RUNTIME]
    ws = session if session is not None else await security.session_of(request)
    values: dict[str, Any] = {
        "session": ws,
        "login": ws.login if ws is not None else None,
        "csrf_token": ws.csrf_token if ws is not None else security.anonymous_csrf(request),
        "base_url": security.base_url(request),
        "signup_policy": rt.logins.signup_policy,
        "mail_enabled": rt.logins.mail_enabled,
        "path": request.path,
        "oauth_enabled": rt.oauth is not None,  # the Connections menu entry (issue 17)
        "request": request,
        "error": None,  # a form's error message, next to the form
        "done": request.query.get("done"),  # what the last POST did (the page it redirected to says so)
    }
    values.update(context or {})
    response = aiohttp_jinja2.render_template(template, request, values, status=status)
    if headers:
        response.headers.update(headers)
    return response


def client_address(request: web.Request) -> str:
    """The caller's address for throttling (``gateway.addresses``)."""
    proxies = request.config_dict[RUNTIME].config.trusted_proxies
    return addresses.client_address(request.remote, request.headers.get("X-Forwarded-For"), proxies)
