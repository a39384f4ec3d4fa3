"""The operator's admin HTTP API, on its own listener (``admin_listen``, loopback by default).

Everything the CLI does, over HTTP, through the same ``Operations``. Protected by the admin token
(config ``admin_token`` or ``AGENTPAY_ADMIN_TOKEN``), compared in constant time. Without a
configured token every endpoint but /healthz answers 503: the API is unreachable, not open.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.api.openapi import openapi_document
from gateway.api.operations import Operations, amount
from gateway.api.service import api_errors, api_log, read_json
from gateway.errors import Forbidden, GatewayError, InvalidInput, Unavailable
from gateway.keys import constant_time_equals, key_from_headers
from gateway.runtime import RUNTIME


class AdminUnauthorized(GatewayError):
    code = "admin_unauthorized"
    http_status = 401
    default_hint = "Send the admin token as 'Authorization: Bearer <token>'"


def _require_token(expected: str | None) -> Callable[..., Any]:
    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in ("/healthz", "/v1/openapi.json"):
            return await handler(request)
        if expected is None:
            raise Unavailable(
                "The admin API is disabled: no admin token is configured",
                hint="Set admin_token in the config or AGENTPAY_ADMIN_TOKEN",
            )
        given = key_from_headers(request.headers)
        if given is None or not constant_time_equals(given, expected):
            raise AdminUnauthorized("Missing or wrong admin token")
        return await handler(request)

    return check


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidInput(f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(f"{name} must be a string")
    return str(value)


def _cents(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if isinstance(value, float):
        raise InvalidInput(f'{name} must be an exact decimal string such as "2.5", not a JSON float')
    return _text(body, name, required=required)


def create_admin_app(ops_factory: Callable[[], Operations], admin_token: str | None) -> web.Application:
    """The admin application. ``ops_factory`` gives the Operations of the running gateway."""
    app = web.Application(middlewares=[api_log, api_errors, _require_token(admin_token)])

    def ops() -> Operations:
        return ops_factory()

    async def ok(value: Any, status: int = 200) -> web.Response:
        return web.json_response(value, status=status)

    async def create_developer(request: web.Request) -> web.Response:
        body = await read_json(request)
        return await ok(await ops().create_developer(_text(body, "name") or ""), 201)

    async def create_user(request: web.Request) -> web.Response:
        body = await read_json(request)
        return await ok(
            await ops().create_user(_text(body, "name") or "", _cents(body, "balance_cents", required=False)), 201
        )

    async def topup(request: web.Request) -> web.Response:
        body = await read_json(request)
        result = await ops().topup(
            request.match_info["name"], _cents(body, "amount_cents") or "", _text(body, "reference", required=False)
        )
        return await ok(result, 200 if result["replayed"] else 201)

    async def show_user(request: web.Request) -> web.Response:
        return await ok(await ops().show_user(request.match_info["name"]))

    async def create_key(request: web.Request) -> web.Response:
        body = await read_json(request)
        result = await ops().create_key(
            user=_text(body, "user") or "",
            server=_text(body, "server") or "",
            expires=_text(body, "expires", required=False),
            spend_limit_cents=_cents(body, "spend_limit_cents", required=False),
            name=_text(body, "name", required=False),
        )
        return await ok(result, 201)

    async def list_keys(request: web.Request) -> web.Response:
        return await ok(await ops().list_keys(request.query.get("user")))

    async def revoke_key(request: web.Request) -> web.Response:
        return await ok(await ops().revoke_key(request.match_info["key"]))

    async def create_token(request: web.Request) -> web.Response:
        body = await read_json(request)
        servers = body.get("servers")
        if not isinstance(servers, list) or not all(isinstance(s, str) for s in servers):
            raise InvalidInput("servers must be a list of server names")
        return await ok(await ops().create_token(developer=_text(body, "developer") or "", servers=servers), 201)

    async def list_tokens(request: web.Request) -> web.Response:
        return await ok(await ops().list_tokens(request.query.get("developer")))

    async def revoke_token(request: web.Request) -> web.Response:
        return await ok(await ops().revoke_token(request.match_info["token"]))

    async def usage(request: web.Request) -> web.Response:
        return await ok(await ops().usage(request.query.get("user"), request.query.get("server")))

    async def earnings(request: web.Request) -> web.Response:
        return await ok(await ops().earnings(request.match_info["name"]))

    async def statement(request: web.Request) -> web.Response:
        return await ok(await ops().statement(request.match_info["name"]))

    async def create_payout(request: web.Request) -> web.Response:
        body = await read_json(request)
        developer, cents = _text(body, "developer") or "", _cents(body, "amount_cents", required=False)
        payments = request.app[RUNTIME].payments
        if payments is not None:  # as `agentpay payouts create` does: the Stripe transfer too
            value = amount(cents, "payout amount") if cents is not None else None
            return await ok(await payments.pay_out(developer, value), 201)
        return await ok(await ops().create_payout(developer, cents), 201)

    async def settle_payout(request: web.Request) -> web.Response:
        body = await read_json(request)
        return await ok(await ops().settle_payout(request.match_info["payout"], _text(body, "reference") or ""))

    async def fail_payout(request: web.Request) -> web.Response:
        return await ok(await ops().fail_payout(request.match_info["payout"]))

    async def list_payouts(request: web.Request) -> web.Response:
        return await ok(await ops().list_payouts(request.query.get("developer")))

    async def refund(request: web.Request) -> web.Response:
        body = await read_json(request)
        result = await ops().refund(
            request.match_info["charge"],
            _cents(body, "amount_cents", required=False),
            request.headers.get("Idempotency-Key"),
        )
        return await ok(result, 200 if result["replayed"] else 201)

    async def verify(request: web.Request) -> web.Response:
        result = await ops().verify()
        return await ok(result, 200 if result["ok"] else 500)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_document("admin"))

    async def metrics(request: web.Request) -> web.Response:
        rt = request.app[RUNTIME]
        rt.metrics.set_price_digest(rt.prices.table.digest)
        return web.Response(body=rt.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    app.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/metrics", metrics),
            web.get("/v1/openapi.json", openapi),
            web.post("/v1/developers", create_developer),
            web.get("/v1/developers/{name}/earnings", earnings),
            web.get("/v1/developers/{name}/statement", statement),
            web.post("/v1/users", create_user),
            web.get("/v1/users/{name}", show_user),
            web.post("/v1/users/{name}/topups", topup),
            web.post("/v1/keys", create_key),
            web.get("/v1/keys", list_keys),
            web.post("/v1/keys/{key}/revoke", revoke_key),
            web.post("/v1/tokens", create_token),
            web.get("/v1/tokens", list_tokens),
            web.post("/v1/tokens/{token}/revoke", revoke_token),
            web.get("/v1/usage", usage),
            web.post("/v1/payouts", create_payout),
            web.get("/v1/payouts", list_payouts),
            web.post("/v1/payouts/{payout}/settle", settle_payout),
            web.post("/v1/payouts/{payout}/fail", fail_payout),
            web.post("/v1/charges/{charge}/refund", refund),
            web.get("/v1/ledger/verify", verify),
        ]
    )
    return app


__all__ = ["AdminUnauthorized", "Forbidden", "create_admin_app"]
