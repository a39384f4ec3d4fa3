"""Wiring: build the aiohttp application from a config. No logic of its own beyond lifecycle."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from gateway import logs, proxy
from gateway.api.openapi import openapi_document
from gateway.api.service import ServiceApi, json_error
from gateway.billing.grants import GrantPolicy
from gateway.billing.reload import PriceBook
from gateway.billing.settlement import Billing, spawn
from gateway.config import GatewayConfig
from gateway.errors import AuthError, ConfigError, GatewayError, MethodNotAllowed, MissingKey
from gateway.http_server import malformed_body_error
from gateway.ledger import open_ledger
from gateway.ledger.interfaces import Accounts, Ledger
from gateway.logins import LoginService, Mailer, open_login_store
from gateway.metrics import Metrics
from gateway.oauth import views as oauth_views
from gateway.oauth.service import OAuthService
from gateway.oauth.store import open_store as open_oauth_store
from gateway.payments import build_payments
from gateway.payments.webhook import PATH as STRIPE_WEBHOOK_PATH
from gateway.payments.webhook import webhook_handler
from gateway.portal import add_portal
from gateway.protocol import jsonrpc
from gateway.protocol.sessions import Sessions, SessionSigner
from gateway.proxy.auth import AUTH_FAILURE_BURST, AUTH_FAILURES_PER_S, Authenticator
from gateway.proxy.deadlines import Deadlines
from gateway.proxy.limits import FailureThrottle, KeyLimits, TooManyRequests
from gateway.proxy.routing import Router, redact_path
from gateway.proxy.upstream_client import UpstreamClient
from gateway.runtime import RUNTIME, Runtime
from gateway.stdio import StdioUpstream

log = structlog.get_logger("gateway")
_SERVICE_API = "/v1/"  # the developers' HTTP API (service_api), mounted on the gateway listener
_KNOWN_METHODS = frozenset(
    {
        "initialize",
        "server/discover",
        "tools/call",
        "tools/list",
        "resources/read",
        "resources/list",
        "prompts/get",
        "prompts/list",
        "ping",
        "batch",
        "GET",
        "DELETE",
        "notifications/initialized",
    }
)


def error_response(exc: GatewayError, request_id: jsonrpc.RequestId | None = None) -> web.Response:
    """The one mapping from a GatewayError to an HTTP response on MCP endpoints."""
    data = {"code": exc.code, **exc.data}
    if exc.hint:
        data["hint"] = exc.hint
    body = jsonrpc.error_body(request_id, exc.jsonrpc_code, exc.text(), data)
    headers = {}
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = exc.allow
    if isinstance(exc, TooManyRequests):
        headers["Retry-After"] = str(exc.retry_after_s)
    if isinstance(exc, AuthError) and exc.http_status == 401:
        if exc.challenge is not None:  # OAuth: where the resource's metadata is (set by the proxy)
            headers["WWW-Authenticate"] = exc.challenge
        elif isinstance(exc, MissingKey):
            headers["WWW-Authenticate"] = 'Bearer realm="agentpay"'
        else:
            headers["WWW-Authenticate"] = 'Bearer realm="agentpay", error="invalid_token"'
    return web.Response(
        body=jsonrpc.dumps(body), status=exc.http_status, content_type="application/json", headers=headers
    )


@web.middleware
async def canonical_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One structured line per request, and GatewayError → response in one place. A body aiohttp
    could not read (a Content-Encoding that does not decode, broken chunks) is a ``BadRequest`` too:
    JSON-RPC on MCP endpoints, the API's error shape under ``/v1/``."""
    fields: dict[str, Any] = {"http": request.method, "path": redact_path(request.rel_url.raw_path)}
    request[proxy.LOG_FIELDS] = fields
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except GatewayError as exc:
        fields["error"] = exc.code
        fields.setdefault("outcome", "error")
        response = error_response(exc, fields.get("rpc_id"))
        status = response.status
        return response
    except web.RequestPayloadError as exc:
        error = malformed_body_error(request, exc)
        fields["error"] = error.code
        fields["outcome"] = "error"
        service = request.rel_url.raw_path.startswith(_SERVICE_API)
        response = json_error(error) if service else error_response(error, fields.get("rpc_id"))
        response.force_close()
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        fields["outcome"] = "client_gone"
        status = 499
        raise
    finally:
        fields["status"] = status
        fields["ms"] = round((time.perf_counter() - started) * 1000, 2)
        if "server" in fields:
            method = fields.get("method", request.method)
            request.app[RUNTIME].metrics.count_request(
                fields["server"], method if method in _KNOWN_METHODS else "other", fields.get("outcome", "error")
            )
        logs.info_fields(log, "request", fields)


async def _not_found(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "error": "not_found",
            "message": "This gateway does not offer OAuth: send your AgentPay API key as 'Authorization: Bearer "
            "ap_...'. If you sent one, it is missing, invalid, expired or revoked, or for another server.",
        },
        status=404,
    )


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    # Only the status: the price table's digest is shown on the admin listener's /metrics.
    if request.app[RUNTIME].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document("service"))


async def check_owners(config: GatewayConfig, ledger: Accounts) -> None:
    """Every server's owner must exist as a developer account before the gateway serves."""
    known = await ledger.developer_names()
    for server in config.servers.values():
        if server.owner not in known:
            raise ConfigError(
                f"server {server.name!r}: owner {server.owner!r} does not exist; "
                f"create it with `agentpay developers create {server.owner}`",
                file=str(config.path),
            )


def server_options(config: GatewayConfig) -> dict[str, Any]:
    """aiohttp server settings for the gateway listener (used by ``serve`` and by the tests)."""
    return {
        "handler_cancellation": True,  # a client that goes away cancels its upstream request
        "access_log": None,  # the canonical request line replaces it (raw paths may embed keys)
        "max_line_size": config.max_header_bytes,
        "max_field_size": config.max_header_bytes,
        "keepalive_timeout": config.client_idle_timeout_s,  # aiohttp's default keeps idle sockets an hour
    }


def login_service(config: GatewayConfig, accounts: Accounts) -> LoginService:
    """The portal's logins, in their own tables of the ledger's database (opened in ``_lifecycle``)."""
    portal = config.portal
    if portal.base_url is None:  # a config built in code rather than loaded: links point at `listen`
        portal = replace(portal, base_url=f"{'https' if config.tls_cert else 'http'}://{config.listen}")
    mailer = Mailer(config.smtp) if config.smtp is not None else None
    return LoginService(open_login_store(config.database), accounts, config=portal, mailer=mailer)


def oauth_service(config: GatewayConfig, ledger: Ledger) -> OAuthService | None:
    """The OAuth authorization server when ``oauth.enabled`` (its tables beside the ledger's). The
    issuer defaults to the origin of ``portal.base_url``, where the consent page is."""
    if not config.oauth.enabled:
        return None
    base = config.portal.base_url or f"{'https' if config.tls_cert else 'http'}://{config.listen}"
    parts = urlsplit(base)
    issuer = config.oauth.issuer or f"{parts.scheme}://{parts.netloc}".lower()
    secret = config.session_secret.encode() if config.session_secret else os.urandom(32)
    return OAuthService(
        store=open_oauth_store(config.database), keys=ledger, config=config, issuer=issuer, consent_secret=secret
    )


def create_app(config: GatewayConfig, *, ledger: Ledger | None = None) -> web.Application:
    """The gateway application. The ledger is opened (and closed) with the app."""
    app = web.Application(middlewares=[canonical_log], client_max_size=config.max_body_bytes)
    the_ledger = ledger if ledger is not None else open_ledger(config.database)
    metrics = Metrics()
    oauth = oauth_service(config, the_ledger)
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    billing = Billing(
        the_ledger,
        owner=owner,
        lease_s=config.hold_lease_s,
        sweep_interval_s=config.sweep_interval_s,
        grants=(
            GrantPolicy(refresh_s=config.key_cache_s, flush_s=config.credit_grants_flush_ms / 1000)
            if config.credit_grants
            else None
        ),
    )
    rt = Runtime(
        config=config,
        ledger=the_ledger,
        prices=PriceBook(config.prices_path, config.servers.keys()),
        billing=billing,
        auth=Authenticator(
            the_ledger,
            cache_s=config.key_cache_s,
            tokens=oauth.store if oauth else None,
            failures=FailureThrottle(burst=AUTH_FAILURE_BURST, per_s=AUTH_FAILURES_PER_S),
        ),
        metrics=metrics,
        sessions=Sessions(window_s=config.resume_window_s),
        signer=SessionSigner(config.session_secret.encode() if config.session_secret else os.urandom(32)),
        limits=KeyLimits(
            max_concurrent=config.max_concurrent_per_key, rate_per_s=config.rate_per_key, burst=config.rate_burst
        ),
        logins=login_service(config, the_ledger),
    )
    rt.hosts = {host.lower(): name for name, srv in config.servers.items() for host in srv.hosts}
    rt.oauth = oauth
    rt.payments = build_payments(config, the_ledger)  # None without payments.stripe
    metrics.track_pending(lambda: billing.inflight)
    app[RUNTIME] = rt
    app[proxy.DEADLINES] = Deadlines()
    app[proxy.UPSTREAMS] = {}
    app[proxy.ROUTER] = Router(frozenset(config.servers), rt.hosts)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_start_draining)
    service = ServiceApi(the_ledger, rt.auth, frozenset(config.servers))
    service_app = service.app()
    service_app.router.add_get("/openapi.json", _openapi)
    app.add_subapp(_SERVICE_API, service_app)
    # No /metrics here: it shows revenue per server, so it is served on the admin listener only,
    # behind the admin token (admin_api). /metrics on this listener is an unknown server (404).
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    if oauth is not None:
        oauth_views.add_routes(app)  # /.well-known/oauth-*, /oauth/*: the authorization server
    app.router.add_route("*", "/.well-known/{tail:.*}", _not_found)
    app.router.add_route("*", "/register", _not_found)
    app.router.add_route("*", STRIPE_WEBHOOK_PATH, webhook_handler(lambda r: r.app[RUNTIME].payments, now=time.time))
    add_portal(app, config)  # /portal/ (and / redirecting there), before the proxy's catch-all
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def _expire_parked_forever(rt: Runtime) -> None:
    """Void held calls whose response never came back on a resumed stream or task result."""
    while True:
        await asyncio.sleep(rt.config.sweep_interval_s)
        for call in rt.sessions.expired():
            if not call.settled:
                call.settled = True
                rt.billing.settle(call.call_id, capture=False)


async def _flush_last_used(rt: Runtime) -> None:
    """On drain: write the keys' last uses gathered since the last flush (a failure is logged: no
    money depends on them)."""
    try:
        await rt.auth.flush_last_used()
    except Exception as exc:  # noqa: BLE001 - the drain goes on whatever the store says
        log.warning("last_used_flush_failed", error=str(exc), keys=rt.auth.unflushed)


async def _start_draining(app: web.Application) -> None:
    app[RUNTIME].draining = True


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    config = rt.config
    await rt.ledger.open()
    tasks: set[asyncio.Task[None]] = set()
    try:
        await rt.logins.open()
        if rt.oauth is not None:
            await rt.oauth.open()
            spawn(rt.oauth.purge_forever(), tasks)
        if rt.payments is not None:
            await rt.payments.open()
            rt.billing.on_capture = rt.payments.on_capture  # balance alerts and auto-recharge
        await check_owners(config, rt.ledger)
        for server in config.servers.values():
            if server.upstream is not None:
                app[proxy.UPSTREAMS][server.name] = UpstreamClient(
                    connect_timeout_s=server.connect_timeout_s, max_connections=server.max_connections
                )
            elif server.stdio is not None:  # the gateway runs it: one child process per session
                stdio = StdioUpstream(server, max_line=config.max_body_bytes)
                app[proxy.UPSTREAMS][server.name] = stdio
                rt.metrics.track_stdio(server.name, stdio.process_count, stdio.session_count)
        spawn(rt.prices.watch(), tasks)
        spawn(rt.billing.renew_forever(), tasks)
        spawn(rt.billing.sweep_forever(), tasks)
        spawn(_expire_parked_forever(rt), tasks)
        spawn(rt.auth.flush_last_used_forever(), tasks)  # keys' last use: one write per 30 s, not per call
        if rt.payments is not None:
            spawn(rt.payments.refresh_forever(), tasks)
            spawn(rt.payments.payout_schedule_forever(), tasks)
        loop = asyncio.get_running_loop()
        rt.prices.install_sighup(loop)
        yield
        rt.prices.remove_sighup(loop)
    finally:
        rt.draining = True
        try:
            async with asyncio.timeout(config.drain_grace_s):
                await rt.billing.wait_settled()
        except TimeoutError:
            log.warning("drain_timeout", pending=rt.billing.inflight)
        await rt.billing.close()  # credit grants: queued captures written, every grant given back
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _flush_last_used(rt)
        for client in app[proxy.UPSTREAMS].values():
            await client.close()
        app[proxy.DEADLINES].close()
        if rt.oauth is not None:
            await rt.oauth.close()
        if rt.payments is not None:
            await rt.payments.close()
        await rt.logins.close()
        await rt.ledger.close()
