"""What one proxied request carries through the modules: its context, what it waits for in the upstream's
answer, and settling or parking the calls it held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from gateway.config import ServerConfig
from gateway.errors import GatewayError
from gateway.ledger.base import KeyRecord, charge_id_for
from gateway.protocol import upstream_ids
from gateway.protocol.sessions import Call, Forwarded, LegacyChannel
from gateway.proxy.deadlines import Deadlines
from gateway.proxy.routing import Route, Router
from gateway.proxy.upstream_client import Upstream
from gateway.runtime import Runtime

LOG_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("log_fields", dict)
DEADLINES: web.AppKey[Deadlines] = web.AppKey("deadlines", Deadlines)  # the request path's timeouts
UPSTREAMS: web.AppKey[dict[str, Upstream]] = web.AppKey("upstreams", dict)  # server -> its client (HTTP or stdio)
ROUTER: web.AppKey[Router] = web.AppKey("router", Router)
PRICE_META = "io.agentpay/price"
RECEIPT_META = "io.agentpay/receipt"
PAYMENT_META = "io.agentpay/payment_required"
CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


class SessionNotFound(GatewayError):
    code = "session_not_found"
    http_status = 404
    jsonrpc_code = -32001


@dataclass(slots=True)
class Exchange:
    """What one request is waiting for in the upstream's answer."""

    key: KeyRecord
    session_id: str | None = None
    scope: str = ""  # where the client's ids live: its session, legacy channel or key
    requests: dict[str, Forwarded] = field(default_factory=dict)  # upstream id -> this request's own
    channel: LegacyChannel | None = None  # a legacy channel whose requests this stream answers
    refusals: list[dict[str, Any]] = field(default_factory=list)
    charged: int = 0  # millicents captured
    client_gone: bool = False
    billable: bool = True  # False once the upstream answered with an HTTP error status
    owner: str = ""  # the key's tag in the upstream ids this exchange mints and accepts

    def __post_init__(self) -> None:
        self.owner = upstream_ids.owner_tag(self.key.id)


@dataclass(slots=True)
class Context:
    request: web.Request
    rt: Runtime
    route: Route
    server: ServerConfig
    key: KeyRecord
    fields: dict[str, Any]  # the request's canonical log line
    deadlines: Deadlines
    upstream_session: str | None = None  # the upstream's own Mcp-Session-Id (the client sees it signed)


def id_scope(key: KeyRecord, session_id: str | None) -> str:
    """Where a client's request ids live: its session, else its key (stateless requests)."""
    return f"s:{session_id}" if session_id is not None else f"k:{key.id}"


TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/list"})


def release_calls(ctx: Context, exchange: Exchange) -> None:
    """At the end of a request: void what this request held and did not settle, or park it when
    the client went away from a session (its response may come on a later stream of the session).
    A task's own hold is not this request's to release: its task keeps it."""
    rt = ctx.rt
    session_id = exchange.session_id if exchange.client_gone else None
    for upstream_id, forwarded in exchange.requests.items():
        rt.sessions.untrack(exchange.scope, forwarded.client_id, upstream_id)
        call = forwarded.call
        if call is None or call.settled or call.parked_at is not None or forwarded.method in TASK_METHODS:
            continue
        if session_id is not None and rt.sessions.park(session_id, forwarded):
            ctx.fields["parked"] = ctx.fields.get("parked", 0) + 1
        else:
            settle_call(ctx, exchange, call, capture=False)
    exchange.requests.clear()


def settle_call(ctx: Context, exchange: Exchange, call: Call, *, capture: bool) -> None:
    """Capture or void a held call, once, wherever it waited."""
    if not call.finish(capture=capture):
        return
    rt = ctx.rt
    rt.sessions.unpark(exchange.session_id, call)
    amount = call.amount
    if call.charge is None and not call.free:
        rt.billing.settle(call.call_id, capture=capture)  # a flat or per-unit price: all that is held
    else:
        rt.billing.settle(call.call_id, capture=capture, amount=call.charge, free=call.free)
    if capture and amount:
        rt.metrics.count_charge(ctx.server.name, amount)
        exchange.charged += amount
        ctx.fields["charge_id"] = charge_id_for(call.call_id)
