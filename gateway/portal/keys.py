"""``/portal/keys``: a user's API keys. Created and revoked through ``Operations`` (what the CLI's
``keys create`` / ``keys revoke`` run); a user sees and revokes only their own keys (any other id,
existing or not, is the same 404). The list shows each key's name and last use ("never" for none); the
last use is written from the gateway's memory every ``proxy.auth.LAST_USED_FLUSH_S`` (30) seconds and
on drain, so it may be that much behind."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.api.operations import Operations
from gateway.errors import InvalidInput, NotFound
from gateway.logins.models import WebSession
from gateway.portal import security
from gateway.portal.client_setup import client_setups
from gateway.portal.render import page
from gateway.runtime import RUNTIME

EXPIRY_CHOICES = (
    ("", "never"),
    ("7d", "in 7 days"),
    ("30d", "in 30 days"),
    ("90d", "in 90 days"),
    ("365d", "in a year"),
)


def operations(request: web.Request) -> Operations:
    rt = request.config_dict[RUNTIME]
    return Operations(rt.ledger, rt.config)


def user_of(ws: WebSession) -> str:
    if ws.login.user is None:
        raise NotFound(
            "this login has no user account",
            hint="Ask the operator to link one (agentpay logins invite EMAIL --user NAME)",
        )
    return ws.login.user


async def _listing(request: web.Request, ws: WebSession, **extra: Any) -> dict[str, Any]:
    rt = request.config_dict[RUNTIME]
    keys = await operations(request).list_keys(user_of(ws)) if ws.login.user is not None else []
    return {
        "keys": list(reversed(keys)),  # newest first
        "servers": sorted(rt.config.servers),
        "expiry_choices": EXPIRY_CHOICES,
        "form": {},
        **extra,
    }


async def keys_page(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    return await page(request, "keys.html", await _listing(request, ws), session=ws)


async def create_key(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    form = await security.form_of(request)
    security.check_csrf(ws, form)
    user = user_of(ws)
    server = form.get("server", "")
    limit = form.get("spend_limit_cents", "").strip() or None
    expires = form.get("expires", "").strip() or None
    name = form.get("name", "").strip() or None  # Operations refuses over 100 characters or control characters
    try:
        created = await operations(request).create_key(
            user=user, server=server, expires=expires, spend_limit_cents=limit, name=name
        )
    except (InvalidInput, NotFound) as exc:
        context = await _listing(request, ws, error=exc.text(), form=form)
        return await page(request, "keys.html", context, status=exc.http_status, session=ws)
    setups = client_setups(security.base_url(request), server, created["key"])
    return await page(request, "key_created.html", {"created": created, "setups": setups}, session=ws)


async def revoke_key(request: web.Request) -> web.StreamResponse:
    ws = await security.require_session(request)
    security.check_csrf(ws, await security.form_of(request))
    key_id = request.match_info["key_id"]
    ops = operations(request)
    own = {k["id"] for k in await ops.list_keys(user_of(ws))}
    if key_id not in own:
        raise NotFound(f"you have no key {key_id!r}", hint="Pick a key from your list of keys")
    await ops.revoke_key(key_id)
    return security.see_other(request, "/portal/keys?done=revoked")
