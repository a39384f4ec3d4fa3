"""The service API under /v1/ for developers who integrate in code (see ``gateway.sdk``).

Authenticated by the developer's service token. Errors share one JSON shape,
``{"error": {"code", "message", "hint"?, "details"?}}``, mapped from ``gateway.errors`` in
``json_error`` (used by the admin API too).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import structlog
from aiohttp import web

from gateway.api.operations import charge_json, iso, statement_json
from gateway.errors import (
    AuthError,
    GatewayError,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    NotFound,
    SpendLimitReached,
)
from gateway.keys import hash_secret, key_from_headers
from gateway.ledger.base import (
    MAX_AMOUNT,
    Charge,
    HoldRequest,
    HoldStatus,
    KeyRecord,
    ServiceToken,
    developer_reference,
)
from gateway.ledger.interfaces import Charges, Holds, Keys, Reports
from gateway.ledger.rows import amount_too_large
from gateway.money import AmountError, format_cents, parse_cents
from gateway.proxy.auth import Authenticator
from gateway.proxy.routing import redact_path

log = structlog.get_logger("gateway.api.service")
SERVICE_OWNER = "service-api"  # holds placed through the API are not renewed by a gateway process
_MAX_TTL_S = 7 * 86400.0


class InvalidServiceToken(GatewayError):
    code = "invalid_service_token"
    http_status = 401
    default_hint = "Send your service token as 'Authorization: Bearer apst_...'; ask the operator for one"


class UserKeyRejected(GatewayError):
    """The *user's* key is not usable; 422 so that 401 always means the service token."""

    http_status = 422

    def __init__(self, cause: AuthError):
        super().__init__(cause.message, hint=cause.hint)
        self.code = cause.code  # type: ignore[misc]


class ServiceLedger(Charges, Holds, Keys, Reports, Protocol):
    """What the service API uses of the ledger: charges and refunds, its developers' holds, service
    tokens and users' keys, and developers' statements."""


def json_error(exc: GatewayError) -> web.Response:
    return web.json_response({"error": exc.to_json()}, status=exc.http_status)


@web.middleware
async def api_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """GatewayError → the one JSON error shape of the HTTP APIs."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return json_error(exc)


@web.middleware
async def api_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One log line per API request (for listeners without the proxy's canonical line); no secrets."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        log.info(
            "api_request",
            http=request.method,
            path=redact_path(request.rel_url.raw_path),
            status=status,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )


async def read_json(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise InvalidInput("The request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInput("The request body must be a JSON object")
    return body


def amount_field(body: dict[str, Any], name: str = "amount_cents", *, required: bool = True) -> int | None:
    if name not in body or body[name] is None:
        if required:
            raise InvalidInput(f'{name} is required (cents as a decimal string, e.g. "2.5")')
        return None
    value = body[name]
    if isinstance(value, float):
        raise InvalidInput(f'{name} must be an exact decimal string such as "2.5", not a JSON float')
    try:
        amount = parse_cents(value)
    except AmountError as exc:
        raise InvalidInput(f"{name}: {exc}") from None
    if amount <= 0:
        raise InvalidInput(f"{name} must be more than 0")
    if amount > MAX_AMOUNT:
        raise amount_too_large(amount, name)
    return amount


class ServiceApi:
    """Handlers; one instance per application, holding the ledger and the key authenticator."""

    def __init__(self, ledger: ServiceLedger, auth: Authenticator, known_servers: frozenset[str]) -> None:
        self.ledger = ledger
        self.auth = auth
        self.known_servers = known_servers
        self._tokens: dict[str, tuple[ServiceToken, float]] = {}

    def app(self) -> web.Application:
        """The service API as a sub-application, mounted at /v1/."""
        app = web.Application(middlewares=[api_errors])
        app.add_routes(
            [
                web.post("/keys/validate", self.validate),
                web.post("/charges", self.charge),
                web.get("/charges", self.list_charges),
                web.post("/charges/{charge_id}/refund", self.refund),
                web.post("/holds", self.hold),
                web.post("/holds/{hold_id}/capture", self.capture),
                web.post("/holds/{hold_id}/release", self.release),
                web.get("/earnings", self.earnings),
            ]
        )
        return app

    async def _token(self, request: web.Request) -> ServiceToken:
        secret = key_from_headers(request.headers)
        if not secret:
            raise InvalidServiceToken("No service token was sent")
        digest = hash_secret(secret)
        now = time.monotonic()
        cached = self._tokens.get(digest)
        token = cached[0] if cached is not None and now - cached[1] < 1.0 else None
        if token is None:
            token = await self.ledger.find_service_token(digest)
            if token is not None:
                self._tokens[digest] = (token, now)
        if token is None:
            raise InvalidServiceToken("The service token is not valid")
        if token.revoked_at is not None:
            raise InvalidServiceToken(f"The service token {token.prefix} has been revoked")
        return token

    def _server(self, token: ServiceToken, body: dict[str, Any]) -> str:
        wanted = body.get("server")
        if wanted is None:
            if len(token.servers) != 1:
                raise InvalidInput(
                    f"This token covers several servers ({', '.join(token.servers)}); name one in 'server'"
                )
            return token.servers[0]
        if not isinstance(wanted, str) or wanted not in token.servers:
            raise InvalidInput(f"This token may not charge for server {wanted!r}")
        return wanted

    async def _user_key(self, body: dict[str, Any], server: str) -> KeyRecord:
        secret = body.get("key")
        try:
            return await self.auth.authenticate(secret if isinstance(secret, str) else None, server)
        except AuthError as exc:
            raise UserKeyRejected(exc) from None

    def _call_id(self, token: ServiceToken, request: web.Request, kind: str) -> str:
        key = request.headers.get("Idempotency-Key", "").strip()
        if not key or len(key) > 255:
            raise InvalidInput("An Idempotency-Key header (1-255 characters) is required for money calls")
        digest = hashlib.sha256(f"{token.developer}\0{kind}\0{key}".encode()).hexdigest()[:32]
        return f"svc_{digest}"

    def _feature(self, body: dict[str, Any]) -> str:
        feature = body.get("feature")
        if not isinstance(feature, str) or not feature.strip() or len(feature) > 200:
            raise InvalidInput("feature (the name of what is charged for, 1-200 characters) is required")
        return feature.strip()

    async def validate(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        body = await read_json(request)
        server = self._server(token, body)
        key = await self._user_key(body, server)
        account = await self.ledger.user_summary(key.user, recent=0)
        return web.json_response(
            {
                "valid": True,
                "user": key.user,
                "server": key.server,
                "key_prefix": key.prefix,
                "available_cents": format_cents(account.available),
            }
        )

    def _hold_request(
        self, token: ServiceToken, key: KeyRecord, server: str, call_id: str, amount: int, feature: str, lease_s: float
    ) -> HoldRequest:
        return HoldRequest(
            call_id=call_id,
            key_id=key.id,
            user=key.user,
            developer=token.developer,
            server=server,
            method="service",
            name=feature,
            amount=amount,
            fee=0,
            lease_s=lease_s,
            owner=SERVICE_OWNER,
        )

    async def charge(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        call_id = self._call_id(token, request, "charge")
        body = await read_json(request)
        server = self._server(token, body)
        amount = amount_field(body)
        assert amount is not None
        feature = self._feature(body)
        key = await self._user_key(body, server)
        result = await self.ledger.charge(self._hold_request(token, key, server, call_id, amount, feature, 60.0))
        if result.charge is None:
            raise _refusal(result.status, amount, result.available, result.spend_remaining)
        status = 200 if result.status is HoldStatus.REPLAYED else 201
        return web.json_response(_receipt(result.charge, result.status is HoldStatus.REPLAYED), status=status)

    async def hold(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        call_id = self._call_id(token, request, "hold")
        body = await read_json(request)
        server = self._server(token, body)
        amount = amount_field(body)
        assert amount is not None
        feature = self._feature(body)
        ttl = body.get("ttl_s", 300)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= _MAX_TTL_S:
            raise InvalidInput(f"ttl_s must be between 1 and {int(_MAX_TTL_S)} seconds")
        key = await self._user_key(body, server)
        outcome = await self.ledger.hold(self._hold_request(token, key, server, call_id, amount, feature, float(ttl)))
        if not outcome.ok:
            raise _refusal(outcome.status, amount, outcome.available, outcome.spend_remaining)
        info = await self.ledger.get_hold(call_id)
        replayed = outcome.status is HoldStatus.REPLAYED
        return web.json_response(
            {
                "id": call_id,
                "amount_cents": format_cents(info.amount),
                "available_cents": format_cents(outcome.available),
                "state": info.state.value,
                "expires_at": iso(info.expires_at),
                "replayed": replayed,
            },
            status=200 if replayed else 201,
        )

    async def _own_hold(self, request: web.Request, token: ServiceToken) -> str:
        """The hold named in the path, if it was placed through the service API for this token's
        developer on one of this token's servers; else 404 with the same message whether it exists or not."""
        hold_id = request.match_info["hold_id"]
        try:
            info = await self.ledger.get_hold(hold_id)
        except NotFound:
            info = None
        if (
            info is None
            or info.developer != token.developer
            or info.server not in token.servers
            or info.method != "service"
        ):
            raise NotFound(f"No hold {hold_id!r} for this token")
        return hold_id

    async def capture(self, request: web.Request) -> web.Response:
        """Capture a hold. Idempotent: capturing a captured hold answers the original charge with
        ``replayed: true`` (200 either way); naming another amount than it captured is a 409."""
        token = await self._token(request)
        hold_id = await self._own_hold(request, token)
        body = await read_json(request)
        amount = amount_field(body, required=False)
        charge = await self.ledger.capture(hold_id, amount)
        if charge.replayed and amount is not None and amount != charge.amount:
            raise IdempotencyConflict(
                f"hold {hold_id!r} was already captured for {format_cents(charge.amount)} cents, "
                f"not {format_cents(amount)}",
                hint="Repeat the capture with the amount it was made for (or none) to get its charge again",
            )
        return web.json_response(_receipt(charge, charge.replayed))

    async def release(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        hold_id = await self._own_hold(request, token)
        released = await self.ledger.void(hold_id)
        return web.json_response({"id": hold_id, "released": released})

    async def refund(self, request: web.Request) -> web.Response:
        """Refund a charge of this token's developer on one of this token's servers. Any other charge,
        existing or not, is the same 404, so a token cannot learn of charges outside its scope. The
        Idempotency-Key lives in this developer's namespace (``base.developer_reference``): it never
        replays, or conflicts with, the operator's refund keys or another developer's."""
        token = await self._token(request)
        charge_id = request.match_info["charge_id"]
        try:
            charge: Charge | None = await self.ledger.get_charge(charge_id)
        except NotFound:
            charge = None
        if charge is None or charge.developer != token.developer or charge.server not in token.servers:
            raise NotFound(f"No charge {charge_id!r} for this token")
        body = await read_json(request)
        amount = amount_field(body, required=False)
        idem = request.headers.get("Idempotency-Key")
        reference = developer_reference(token.developer, idem) if idem else None
        transfer = await self.ledger.refund(charge.id, amount, reference=reference)
        return web.json_response(
            {
                "id": transfer.id,
                "charge_id": charge.id,
                "amount_cents": format_cents(transfer.amount),
                "replayed": transfer.replayed,
            },
            status=200 if transfer.replayed else 201,
        )

    async def list_charges(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        limit = _limit(request)
        before = request.query.get("before")
        charges = await self.ledger.list_charges(
            developer=token.developer, servers=token.servers, limit=limit, before=before
        )
        return web.json_response(
            {
                "charges": [charge_json(c) for c in charges],
                "next": charges[-1].id if len(charges) == limit else None,
            }
        )

    async def earnings(self, request: web.Request) -> web.Response:
        token = await self._token(request)
        earned = await self.ledger.earnings(token.developer)
        breakdown = await self.ledger.earnings_breakdown(token.developer)
        lines = await self.ledger.statement(token.developer, limit=_limit(request), before=request.query.get("before"))
        return web.json_response(
            {
                "developer": token.developer,
                "earnings_cents": format_cents(earned.earnings),
                "lifetime_cents": format_cents(earned.lifetime),
                "by_feature": [
                    {"server": b.server, "name": b.name, "charges": b.charges, "amount_cents": format_cents(b.amount)}
                    for b in breakdown
                    if b.server in token.servers  # the token's servers only; totals are the developer's
                ],
                "statement": [statement_json(line) for line in lines],
            }
        )


def _limit(request: web.Request) -> int:
    text = request.query.get("limit", "50")
    if not (text.isascii() and text.isdigit()):  # int() would also take fullwidth digits or " 50 "
        raise InvalidInput("limit must be an integer from 1 to 500, in ASCII digits")
    limit = int(text)
    if not 1 <= limit <= 500:
        raise InvalidInput("limit must be an integer from 1 to 500")
    return limit


def _refusal(status: HoldStatus, amount: int, available: int, spend_remaining: int | None) -> GatewayError:
    details = {"price_cents": format_cents(amount), "available_cents": format_cents(available)}
    if status is HoldStatus.SPEND_LIMIT:
        details["spend_remaining_cents"] = format_cents(spend_remaining or 0)
        return SpendLimitReached(
            f"This key's spending limit leaves {details['spend_remaining_cents']}¢, "
            f"less than {details['price_cents']}¢",
            data=details,
        )
    return InsufficientFunds(
        f"The user's available balance is {details['available_cents']}¢, less than {details['price_cents']}¢",
        data=details,
    )


def _receipt(charge: Charge, replayed: bool) -> dict[str, Any]:
    return {
        "id": charge.id,
        "amount_cents": format_cents(charge.amount),
        "balance_cents": format_cents(charge.balance_after),
        "user": charge.user,
        "server": charge.server,
        "feature": charge.name,
        "replayed": replayed,
    }
