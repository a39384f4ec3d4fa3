"""The MCP reverse-proxy handler: authenticate → price → hold → forward → relay → capture/void.

The gateway owns the ids it sends upstream (``gateway.upstream_ids``): every forwarded request gets
a gateway-unique id and its response gets the client's id back, so a response settles only the
call whose request produced it. Responses are otherwise relayed untouched unless they answer a held
call (a receipt is added to the result's ``_meta``) or a list whose items have prices
(``io.agentpay/price`` in each item's ``_meta``). SSE is relayed event by event. A held call is
captured only after the response carrying its success was written to the client; anything else
voids it, except that a call of a session whose client went away stays held until its response
arrives on a later stream of the session (or the resume window ends), and a task-augmented call
stays held until its task's result is delivered or the upstream confirms it failed or was
cancelled. A priced result the gateway can no longer bill is withheld, never delivered free.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp import web

from gateway import jsonrpc, sse, upstream_ids
from gateway.config import GatewayConfig, ServerConfig
from gateway.deadlines import Deadlines
from gateway.errors import (
    INVALID_PARAMS,
    PAYMENT_REQUIRED,
    RESULT_WITHHELD,
    BadRequest,
    BodyTooLarge,
    GatewayError,
    MethodNotAllowed,
    OriginForbidden,
    UnknownServer,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.jsonrpc import LIST_METHODS, Message, Outcome
from gateway.keys import key_from_headers
from gateway.ledger.base import HoldOutcome, HoldRequest, HoldStatus, KeyRecord, charge_id_for
from gateway.money import format_cents
from gateway.pricing import PriceTable
from gateway.routing import Route, Router
from gateway.runtime import RUNTIME, Runtime
from gateway.sessions import Call, Forwarded, LegacyChannel
from gateway.upstream import ForwardedFor, downstream_headers, upstream_headers
from gateway.upstream_client import UpstreamClient, UpstreamResponse

LOG_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("log_fields", dict)
DEADLINES: web.AppKey[Deadlines] = web.AppKey("deadlines", Deadlines)  # the request path's timeouts
UPSTREAMS: web.AppKey[dict[str, UpstreamClient]] = web.AppKey("upstreams", dict)  # server -> its client
ROUTER: web.AppKey[Router] = web.AppKey("router", Router)
PRICE_META = "io.agentpay/price"
RECEIPT_META = "io.agentpay/receipt"
PAYMENT_META = "io.agentpay/payment_required"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_SMALLER_BODY = "Send a smaller request"
_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


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


async def handle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    fields = request[LOG_FIELDS]
    headers = request.headers
    route = request.app[ROUTER].resolve(headers.get("Host"), request.rel_url.raw_path)
    server = rt.config.servers[route.server]
    fields["server"] = server.name
    origin = headers.get("Origin")
    if origin is not None:
        _check_origin(origin, server, rt.config)
    key = await rt.auth.authenticate(route.path_key or key_from_headers(headers), server.name)
    fields["key"] = key.prefix
    if server.upstream is None:
        raise UnknownServer(
            f"Server {server.name!r} is integrated through the AgentPay SDK and has no MCP endpoint here",
            hint="Call the developer's own server URL",
        )
    rt.limits.acquire(key.id)
    try:
        return await _dispatch(Context(request, rt, route, server, key, fields, request.app[DEADLINES]))
    finally:
        rt.limits.release(key.id)


async def _dispatch(ctx: Context) -> web.StreamResponse:
    request, rt, route, key, fields = ctx.request, ctx.rt, ctx.route, ctx.key, ctx.fields
    if route.endpoint == "sse":
        if request.method != "GET":
            raise MethodNotAllowed(
                "The SSE endpoint takes GET", allow="GET", hint="POST messages to the endpoint the stream announces"
            )
        return await _legacy_stream(ctx)
    if route.endpoint == "messages":
        if request.method != "POST":
            raise MethodNotAllowed("The messages endpoint takes POST", allow="POST")
        return await _legacy_post(ctx)
    client_session = request.headers.get("Mcp-Session-Id")
    session_id = None
    if client_session is not None:
        session_id = rt.signer.unwrap(client_session, key.id)
        if session_id is None:  # opened with another key, forged, or from another deployment
            raise SessionNotFound("Session not found", hint="Start a new session (initialize) with your own key")
        ctx.upstream_session = session_id
    if request.method == "POST":
        return await _post(ctx, session_id)
    if request.method in ("GET", "DELETE"):
        fields["method"] = request.method
        return await _forward(ctx, Exchange(key, session_id, scope=_scope(key, session_id)), body=None)
    raise MethodNotAllowed(f"Method {request.method} is not supported on an MCP endpoint", allow="POST, GET, DELETE")


def _scope(key: KeyRecord, session_id: str | None) -> str:
    """Where a client's request ids live: its session, else its key (stateless requests)."""
    return f"s:{session_id}" if session_id is not None else f"k:{key.id}"


def _check_origin(origin: str, server: ServerConfig, config: GatewayConfig) -> None:
    if origin.lower().rstrip("/") in config.allowed_origins:
        return
    try:
        host = urlsplit(origin).hostname
    except ValueError:  # not even a URL ("http://[::1")
        host = None
    if host is not None and (host in _LOOPBACK or host in server.hosts):
        return
    raise OriginForbidden(
        f"Requests from origin {origin!r} are not allowed",
        hint="Add the origin to allowed_origins in the gateway config if it is legitimate",
    )


def _body_if_arrived(request: web.Request, config: GatewayConfig) -> bytes | None:
    """The request body if it has all arrived with the head (the usual case), else None."""
    limit = config.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"The request body is {request.content_length} bytes; the limit is {limit}", hint=_SMALLER_BODY
        )
    content = request.content
    if not content.is_eof():
        return None
    body = content.read_nowait()
    if len(body) > limit:
        raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes", hint=_SMALLER_BODY)
    return body


async def _read_body(request: web.Request, config: GatewayConfig, deadlines: Deadlines) -> bytes:
    body = _body_if_arrived(request, config)
    if body is not None:
        return body
    limit = config.max_body_bytes
    chunks = bytearray()
    try:
        async with deadlines.timeout(config.client_body_timeout_s):
            async for chunk in request.content.iter_any():
                chunks += chunk
                if len(chunks) > limit:
                    raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes", hint=_SMALLER_BODY)
    except TimeoutError:
        raise ClientTooSlow(
            f"The request body did not arrive within {config.client_body_timeout_s:g}s", hint="Send the body promptly"
        ) from None
    return bytes(chunks)


class ClientTooSlow(GatewayError):
    code = "client_too_slow"
    http_status = 408
    jsonrpc_code = -32600


async def _admit_all(ctx: Context, body: bytes, exchange: Exchange) -> tuple[jsonrpc.Incoming, list[dict[str, Any]]]:
    """Parse a POSTed body and decide, message by message, what is forwarded (holding priced calls
    and giving each request the gateway's own id). Returns the messages to forward, as sent."""
    rt, fields = ctx.rt, ctx.fields
    incoming = jsonrpc.parse_body(body, max_batch_items=rt.config.max_batch_items)
    first = incoming.messages[0]
    fields["method"] = "batch" if incoming.is_batch else (first.method or "response")
    if not incoming.is_batch and first.has_id:
        fields["rpc_id"] = first.id
    headers = ctx.request.headers
    jsonrpc.check_routing_headers(incoming, headers.get("Mcp-Method"), headers.get("Mcp-Name"))
    table = rt.prices.table  # prices in force when the call is held are the ones charged
    forwarded: list[dict[str, Any]] = []
    try:
        for msg in incoming.messages:
            out = await _admit(ctx, msg, table, exchange)
            if out is not None:
                forwarded.append(out)
    except BaseException:
        _release(ctx, exchange)
        raise
    return incoming, forwarded


def _forward_body(incoming: jsonrpc.Incoming, forwarded: list[dict[str, Any]]) -> bytes:
    return jsonrpc.dumps(forwarded if incoming.is_batch else forwarded[0])


async def _post(ctx: Context, session_id: str | None) -> web.StreamResponse:
    body = await _read_body(ctx.request, ctx.rt.config, ctx.deadlines)
    exchange = Exchange(ctx.key, session_id, scope=_scope(ctx.key, session_id))
    incoming, forwarded = await _admit_all(ctx, body, exchange)
    if not forwarded:
        ctx.fields["outcome"] = "refused"
        value = exchange.refusals if incoming.is_batch else exchange.refusals[0]
        return web.Response(body=jsonrpc.dumps(value), content_type="application/json")
    return await _forward(ctx, exchange, body=_forward_body(incoming, forwarded))


_TASK_METHODS = frozenset({"tasks/get", "tasks/result", "tasks/cancel", "tasks/list"})


async def _admit(ctx: Context, msg: Message, table: PriceTable, exchange: Exchange) -> dict[str, Any] | None:
    """Decide whether one message is forwarded, and as what; place the hold of a priced call.
    None when the gateway answers it itself (a refusal in ``exchange.refusals``)."""
    rt, key = ctx.rt, ctx.key
    method = msg.method
    if method is None:
        return msg.body  # a response to a server-to-client request: the upstream chose its id
    if method == "notifications/cancelled":
        return _cancellation(ctx, msg, exchange)
    if msg.id is None:
        if method in _TASK_METHODS:
            raise BadRequest(
                f"{method} must be a request with an id", hint="Give the message a string or integer id"
            )
        if _price_of(ctx, msg, table) != 0:
            raise BadRequest(
                f"A priced {method} must be a request with an id, not a notification",
                hint="Give the message an id so its result can be returned and billed",
            )
        return msg.body
    forwarded = Forwarded(msg.id, method)
    if method in _TASK_METHODS and method != "tasks/list":
        task_id = msg.params.get("taskId")
        task = rt.sessions.task_of(key.id, task_id)
        if task is None:  # unknown here, or created with another key: never forwarded
            exchange.refusals.append(_task_not_found(msg))
            return None
        forwarded.task_id = task_id
        forwarded.call = task.call
    else:
        price = _price_of(ctx, msg, table)
        if price:
            call = await _hold(ctx, msg, price, exchange)
            if call is None:
                return None
            forwarded.call = call
    call = forwarded.call
    nonce = call.call_id if call is not None and method not in _TASK_METHODS else rt.billing.new_call_id()
    upstream_id = upstream_ids.mint(nonce, msg.id, priced=call is not None)
    if call is not None and method not in _TASK_METHODS:
        call.upstream_id = upstream_id
    exchange.requests[upstream_id] = forwarded
    rt.sessions.track(exchange.scope, msg.id, upstream_id)
    return {**msg.body, "id": upstream_id}


def _price_of(ctx: Context, msg: Message, table: PriceTable) -> int:
    target = msg.priced_target()
    if target is None:
        return 0
    kind, name = target
    ctx.fields.setdefault("target", name)
    price = table.lookup(ctx.server.name, kind, name)
    ctx.fields["price_cents"] = format_cents(price)
    return price


def _cancellation(ctx: Context, msg: Message, exchange: Exchange) -> dict[str, Any]:
    """``notifications/cancelled`` names the client's id of a request: the upstream knows it by ours."""
    params = msg.params
    upstream_id = ctx.rt.sessions.upstream_id_of(exchange.scope, params.get("requestId"))
    if upstream_id is None:
        return msg.body
    return {**msg.body, "params": {**params, "requestId": upstream_id}}


def _task_not_found(msg: Message) -> dict[str, Any]:
    return jsonrpc.error_body(
        msg.id,
        INVALID_PARAMS,
        "Task not found",
        {"code": "task_not_found", "hint": "Use a task id returned to a call made with this same API key"},
    )


async def _hold(ctx: Context, msg: Message, price: int, exchange: Exchange) -> Call | None:
    """Hold the price of a priced request; None (and a refusal) when the balance or cap refuses it."""
    rt, server, key = ctx.rt, ctx.server, ctx.key
    kind, name = msg.priced_target() or ("tool", "")
    call_id = rt.billing.new_call_id()
    outcome = await rt.billing.hold(
        HoldRequest(
            call_id=call_id,
            key_id=key.id,
            user=key.user,
            developer=server.owner,
            server=server.name,
            method=msg.method or "",
            name=name,
            amount=price,
            fee=price * server.fee_basis_points // 10_000,
            lease_s=rt.config.hold_lease_s,
            owner=rt.billing.owner,
        )
    )
    if not outcome.ok:
        rt.metrics.refusals.labels(server=server.name, reason=outcome.status.value).inc()
        modern = _is_modern(ctx.request, msg)
        exchange.refusals.append(_payment_refusal(msg, kind, name, price, outcome, rt.config, modern=modern))
        return None
    assert msg.id is not None
    return Call(call_id, msg.id, server.name, kind, name, price, outcome.available)


def _is_modern(request: web.Request, msg: Message) -> bool:
    """Whether the caller speaks the 2026-07-28 (stateless) era, where results carry ``resultType``."""
    meta = msg.params.get("_meta")  # the body is authoritative: relays (mcp-remote) may rewrite headers
    version = meta.get("io.modelcontextprotocol/protocolVersion") if isinstance(meta, dict) else None
    if version is None:
        version = request.headers.get("MCP-Protocol-Version")
    return isinstance(version, str) and version >= "2026-07-28"


def _payment_refusal(
    msg: Message,
    kind: str,
    name: str,
    price: int,
    outcome: HoldOutcome,
    config: GatewayConfig,
    *,
    modern: bool = False,
) -> dict[str, Any]:
    topup = config.topup_url or "ask the gateway operator to top up your AgentPay balance"
    if outcome.status is HoldStatus.SPEND_LIMIT:
        left = format_cents(outcome.spend_remaining or 0)
        code, reason = "spend_limit_reached", f"this API key has {left}¢ left of its spending limit"
        what_to_do = "Ask the gateway operator to raise the key's limit or issue a new key."
    else:
        code = "insufficient_funds"
        reason = f"your available AgentPay balance is {format_cents(outcome.available)}¢"
        what_to_do = f"To continue, top up: {topup}."
    label = {"tool": "Calling tool", "resource": "Reading resource", "prompt": "Getting prompt"}[kind]
    text = f"Payment required: {label} {name!r} costs {format_cents(price)}¢ and {reason}. {what_to_do}"
    data: dict[str, Any] = {
        "code": code,
        "price_cents": format_cents(price),
        "available_cents": format_cents(outcome.available),
        "topup_url": config.topup_url,
    }
    if outcome.spend_remaining is not None:
        data["spend_remaining_cents"] = format_cents(outcome.spend_remaining)
    if kind == "tool":
        result: dict[str, Any] = {
            "content": [{"type": "text", "text": text}],
            "isError": True,
            "_meta": {PAYMENT_META: data},
        }
        if modern:
            result["resultType"] = "complete"
        return jsonrpc.result_body(msg.id, result)
    return jsonrpc.error_body(msg.id, PAYMENT_REQUIRED, text, data)


def _release(ctx: Context, exchange: Exchange) -> None:
    """At the end of a request: void what this request held and did not settle, or park it when
    the client went away from a session (its response may come on a later stream of the session).
    A task's own hold is not this request's to release: its task keeps it."""
    rt = ctx.rt
    session_id = exchange.session_id if exchange.client_gone else None
    for upstream_id, forwarded in exchange.requests.items():
        rt.sessions.untrack(exchange.scope, forwarded.client_id, upstream_id)
        call = forwarded.call
        if call is None or call.settled or call.parked_at is not None or forwarded.method in _TASK_METHODS:
            continue
        if session_id is not None and rt.sessions.park(session_id, forwarded):
            ctx.fields["parked"] = ctx.fields.get("parked", 0) + 1
        else:
            _settle(ctx, exchange, call, capture=False)
    exchange.requests.clear()


def _settle(ctx: Context, exchange: Exchange, call: Call, *, capture: bool) -> None:
    """Capture or void a held call, once, wherever it waited."""
    if not call.finish(capture=capture):
        return
    rt = ctx.rt
    rt.sessions.unpark(exchange.session_id, call)
    rt.billing.settle(call.call_id, capture=capture)
    if capture:
        rt.metrics.count_charge(ctx.server.name, call.price)
        exchange.charged += call.price
        ctx.fields["charge_id"] = charge_id_for(call.call_id)


def _forwarded_for(request: web.Request, config: GatewayConfig) -> ForwardedFor:
    peer = request.remote
    trusted = peer is not None and _is_trusted(peer, config.trusted_proxies)
    return ForwardedFor(
        client_ip=peer,
        proto=(request.headers.get("X-Forwarded-Proto") if trusted else None) or request.scheme,
        host=(request.headers.get("X-Forwarded-Host") if trusted else None) or request.headers.get("Host"),
        prior_chain=request.headers.get("X-Forwarded-For") if trusted else None,
    )


def _is_trusted(peer: str, proxies: tuple[str, ...]) -> bool:
    if not proxies:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for entry in proxies:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


async def _open_upstream(
    ctx: Context, method: str, url: str, *, body: bytes | None, accept_sse: bool = False
) -> UpstreamResponse:
    server, request = ctx.server, ctx.request
    headers = upstream_headers(
        request.headers, forwarded=_forwarded_for(request, ctx.rt.config), extra=server.upstream_headers
    )
    if accept_sse:
        headers["Accept"] = "text/event-stream"
    if ctx.upstream_session is not None:
        headers["Mcp-Session-Id"] = ctx.upstream_session
    started = time.perf_counter()
    try:
        async with ctx.deadlines.timeout(server.read_timeout_s):
            upstream = await request.app[UPSTREAMS][server.name].request(
                method,
                url,
                data=body,
                headers=headers,
                key=ctx.key.id,  # one key may hold only its fair share of the server's connections
                key_share=server.max_key_share,
                queue_timeout_s=server.upstream_queue_timeout_s,
            )
    except TimeoutError:
        raise UpstreamTimeout(f"Server {server.name!r} did not answer within {server.read_timeout_s:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(f"Server {server.name!r} is unreachable ({type(exc).__name__})") from None
    ctx.rt.metrics.observe_upstream(server.name, time.perf_counter() - started)
    ctx.fields["upstream_status"] = upstream.status
    return upstream


async def _forward(ctx: Context, exchange: Exchange, *, body: bytes | None) -> web.StreamResponse:
    rt, request, server, fields = ctx.rt, ctx.request, ctx.server, ctx.fields
    assert server.upstream is not None
    url = server.upstream
    if request.rel_url.query_string:
        url = f"{url}?{request.rel_url.query_string}"
    upstream: UpstreamResponse | None = None
    try:
        upstream = await _open_upstream(ctx, request.method, url, body=body)
        if request.method == "DELETE" and upstream.status < 300 and exchange.session_id is not None:
            for call in rt.sessions.drop(exchange.session_id):
                _settle(ctx, exchange, call, capture=False)
        if upstream.status >= 300:
            exchange.billable = False  # nothing in an HTTP error is billed (nor delivered, if priced)
            if upstream.status >= 500:
                fields["outcome"] = "upstream_error"
        content_type = upstream.headers.get("Content-Type", "")
        answers = bool(exchange.requests or exchange.refusals)
        if content_type.startswith("text/event-stream") and (answers or request.method == "GET"):
            # A GET stream may carry any response of the session (a resumed stream): always read.
            return await _relay_sse(ctx, upstream, exchange)
        if answers and (exchange.billable or content_type.startswith("application/json")):
            return await _relay_json(ctx, upstream, exchange)
        _release(ctx, exchange)
        return await _stream_raw(ctx, upstream)
    except asyncio.CancelledError:
        exchange.client_gone = True
        raise
    finally:
        _release(ctx, exchange)
        if upstream is not None:
            upstream.release()
        if exchange.charged:
            fields["charged_cents"] = format_cents(exchange.charged)
        if "outcome" not in fields:
            fields["outcome"] = "charged" if exchange.charged else ("refused" if exchange.refusals else "ok")


def _client_headers(ctx: Context, upstream: UpstreamResponse) -> Any:
    """The upstream's response headers for the client, with its session id signed to the caller's key."""
    headers = downstream_headers(upstream.headers.items())
    session = headers.get("Mcp-Session-Id")
    if session is not None:
        headers["Mcp-Session-Id"] = ctx.rt.signer.wrap(session, ctx.key.id)
    return headers


def _arrived(upstream: UpstreamResponse) -> bytes | None:
    """The whole response body when it has already arrived, else None. A small answer usually comes
    in the same packets as its headers: then it is taken as it is, with no wait and so no timer."""
    content = upstream.content
    if content.is_eof() and content.exception() is None:
        return content.read_nowait()
    return None


def _whole_answer(ctx: Context, upstream: UpstreamResponse) -> web.Response | None:
    """The upstream's answer relayed untouched in one response, if its body has already arrived."""
    body = _arrived(upstream)
    if body is None:
        return None
    return web.Response(
        status=upstream.status, reason=upstream.reason, body=body, headers=_client_headers(ctx, upstream)
    )


async def _stream_raw(ctx: Context, upstream: UpstreamResponse) -> web.StreamResponse:
    """Relay status, headers and body untouched: in one response when the body has already arrived,
    else chunk by chunk as they arrive."""
    whole = _whole_answer(ctx, upstream)
    if whole is not None:
        return whole
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(_client_headers(ctx, upstream))
    content_length = upstream.headers.get("Content-Length")
    if content_length is not None:
        response.content_length = int(content_length)
    await response.prepare(ctx.request)
    try:
        async for chunk in _chunks(upstream, None, ctx.rt.config.stream_idle_timeout_s, ctx.deadlines):
            assert isinstance(chunk, bytes)
            await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        ctx.fields["outcome"] = "upstream_broke_stream"
        return response
    except TimeoutError:
        ctx.fields["outcome"] = "stream_idle_timeout"
        return response
    await response.write_eof()
    return response


async def _relay_json(ctx: Context, upstream: UpstreamResponse, exchange: Exchange) -> web.StreamResponse:
    server = ctx.server
    raw = _arrived(upstream)
    if raw is None:
        try:
            async with ctx.deadlines.timeout(server.read_timeout_s):
                raw = await upstream.read()
        except TimeoutError:
            raise UpstreamTimeout(
                f"Server {server.name!r} did not finish its answer within {server.read_timeout_s:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"Server {server.name!r} broke off its answer ({type(exc).__name__})") from None
    to_capture: list[_Capture] = []
    if raw.strip():
        try:
            value = jsonrpc.loads(raw)
        except ValueError:
            value = None  # not JSON: relayed as it is, and nothing is captured
        if value is not None:
            changed = _process_value(ctx, value, exchange, to_capture)
            if exchange.refusals:
                value = (value if isinstance(value, list) else [value]) + exchange.refusals
                changed = True
            if changed:
                raw = jsonrpc.dumps(value)
    elif exchange.refusals:
        raw = jsonrpc.dumps(exchange.refusals)
    # Written here, not by aiohttp after the handler returns: a call is captured only once its
    # success has been written to the client. Headers and body go out in one write.
    response = web.Response(
        status=upstream.status, reason=upstream.reason, body=raw, headers=_client_headers(ctx, upstream)
    )
    await response.prepare(ctx.request)
    await response.write_eof()
    _capture(ctx, exchange, to_capture)
    return response


async def _relay_sse(
    ctx: Context,
    upstream: UpstreamResponse,
    exchange: Exchange,
    *,
    rewrite: Callable[[sse.Event], bytes | None] | None = None,
    inject: asyncio.Queue[bytes] | None = None,
) -> web.StreamResponse:
    """Relay an SSE stream event by event, giving responses their client's id back and settling held
    calls on the events that answer them. ``rewrite`` may replace an event; ``inject`` carries
    events the gateway adds (legacy SSE)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(_client_headers(ctx, upstream))
    await response.prepare(ctx.request)
    max_event = ctx.rt.config.max_body_bytes * 4
    parser = sse.Parser(max_event_bytes=max_event)
    try:
        for refusal in exchange.refusals:
            await response.write(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
        async for chunk in _chunks(upstream, inject, ctx.rt.config.stream_idle_timeout_s, ctx.deadlines):
            if isinstance(chunk, _Injected):
                await response.write(chunk.data)
                continue
            for event in parser.feed(chunk):
                out = rewrite(event) if rewrite is not None else None
                to_capture: list[_Capture] = []
                if out is None:
                    out = _process_event(ctx, event, exchange, to_capture)
                await response.write(out)
                _capture(ctx, exchange, to_capture)
    except _CLIENT_GONE:
        exchange.client_gone = True
        ctx.fields["outcome"] = "client_gone"
        return response
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, sse.EventTooLarge) as exc:
        ctx.fields["outcome"] = "upstream_broke_stream"
        ctx.fields["error"] = type(exc).__name__
        return response
    except TimeoutError:
        ctx.fields["outcome"] = "stream_idle_timeout"
        return response
    if parser.pending():
        await response.write(parser.pending())
    await response.write_eof()
    return response


@dataclass(slots=True, frozen=True)
class _Injected:
    data: bytes


async def _chunks(
    upstream: UpstreamResponse, inject: asyncio.Queue[bytes] | None, idle_s: float, deadlines: Deadlines
) -> Any:
    """Upstream body chunks as they arrive, merged with injected events when there is an injection
    queue. Raises TimeoutError when the upstream sends nothing for ``idle_s``."""
    if inject is None:
        while True:
            async with deadlines.timeout(idle_s):
                chunk = await upstream.content.readany()
            if not chunk:
                return
            yield chunk
    reader = asyncio.ensure_future(upstream.content.readany())
    waiter = asyncio.ensure_future(inject.get())
    try:
        while True:
            done, _ = await asyncio.wait({reader, waiter}, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError
            if waiter in done:
                yield _Injected(waiter.result())
                waiter = asyncio.ensure_future(inject.get())
            if reader in done:
                chunk = reader.result()
                if not chunk:
                    return
                yield chunk
                reader = asyncio.ensure_future(upstream.content.readany())
    finally:
        reader.cancel()
        waiter.cancel()


@dataclass(slots=True, frozen=True)
class _Capture:
    """A call to capture once the response carrying its success has been written."""

    upstream_id: str
    forwarded: Forwarded
    call: Call


_OUR_ID = '"' + upstream_ids.PREFIX


def _process_event(ctx: Context, event: sse.Event, exchange: Exchange, to_capture: list[_Capture]) -> bytes:
    data = event.data
    if not data or data.lstrip()[:1] not in ("{", "[") or (_OUR_ID not in data and "\\u" not in data):
        return event.raw  # no id the gateway minted can be in it (as written, or escaped)
    try:
        value = jsonrpc.loads(data)
    except ValueError:
        return event.raw
    if _process_value(ctx, value, exchange, to_capture):
        return event.with_data(jsonrpc.dumps(value).decode())
    return event.raw


def _process_value(ctx: Context, value: Any, exchange: Exchange, to_capture: list[_Capture]) -> bool:
    changed = False
    for item in jsonrpc.responses_in(value):
        changed |= _process_response(ctx, item, exchange, to_capture)
    return changed


def _lookup(ctx: Context, exchange: Exchange, upstream_id: str) -> Forwarded | None:
    """The forwarded request an upstream id answers: this request's own, its legacy channel's, or a
    call of its session parked when an earlier stream lost its client."""
    forwarded = exchange.requests.get(upstream_id)
    if forwarded is None and exchange.channel is not None:
        forwarded = exchange.channel.pending.get(upstream_id)
    if forwarded is None and exchange.session_id is not None:
        forwarded = ctx.rt.sessions.pending(exchange.session_id).get(upstream_id)
    return forwarded


def _forget(ctx: Context, exchange: Exchange, upstream_id: str, forwarded: Forwarded) -> None:
    """The request's answer has been dealt with: stop waiting for it wherever it waited."""
    exchange.requests.pop(upstream_id, None)
    if exchange.channel is not None:
        exchange.channel.pending.pop(upstream_id, None)
    ctx.rt.sessions.untrack(exchange.scope, forwarded.client_id, upstream_id)
    if forwarded.call is not None and forwarded.method not in _TASK_METHODS:
        ctx.rt.sessions.unpark(exchange.session_id, forwarded.call)


def _process_response(ctx: Context, item: dict[str, Any], exchange: Exchange, to_capture: list[_Capture]) -> bool:
    """Give one upstream response its client's id back, and settle, bind, annotate or withhold what
    it carries. Returns True if ``item`` was changed."""
    upstream_id = item.get("id")
    decoded = upstream_ids.decode(upstream_id)
    if decoded is None:
        return False  # not an id the gateway minted (an upstream's own notification-like answer)
    assert isinstance(upstream_id, str)
    item["id"] = decoded.client_id
    forwarded = _lookup(ctx, exchange, upstream_id)
    outcome = jsonrpc.classify_response(item)
    if forwarded is None:
        if decoded.priced and outcome in _DELIVERS_VALUE:
            _withhold(item, "its hold was released before the result arrived")
        return True
    call = forwarded.call
    method = forwarded.method
    if call is None or method in ("tasks/get", "tasks/cancel", "tasks/list"):
        _forget(ctx, exchange, upstream_id, forwarded)
        _answer_unpriced(ctx, item, exchange, forwarded, outcome)
        return True
    if outcome in _DELIVERS_VALUE and (call.settled or not exchange.billable):
        if call.captured:
            if outcome is Outcome.SUCCESS:
                _add_receipt(item, call)  # a replay of a result already paid for
            return True
        # Voided, or not billable (an HTTP error status): the result is not delivered free.
        _forget(ctx, exchange, upstream_id, forwarded)
        _withhold(item, "its hold was released" if call.settled else "the upstream answered with an error")
        if method != "tasks/result":
            _settle(ctx, exchange, call, capture=False)
        return True
    if outcome is Outcome.SUCCESS:
        _add_receipt(item, call)
        to_capture.append(_Capture(upstream_id, forwarded, call))  # forgotten once captured
        return True
    _forget(ctx, exchange, upstream_id, forwarded)
    if method == "tasks/result":
        if outcome is Outcome.TOOL_ERROR:  # the task ran and failed
            _settle(ctx, exchange, call, capture=False)
        return True  # anything else leaves the task's hold to the task
    if outcome is Outcome.TASK_CREATED:
        task_id = item["result"]["task"].get("taskId")
        if isinstance(task_id, str) and ctx.rt.sessions.bind_task(exchange.key.id, task_id, call):
            return True  # held until the task's result is delivered, or it fails or is cancelled
        _withhold(item, "the task it created could not be tracked")
    _settle(ctx, exchange, call, capture=False)
    return True


_DELIVERS_VALUE = frozenset({Outcome.SUCCESS, Outcome.TASK_CREATED})


def _answer_unpriced(
    ctx: Context, item: dict[str, Any], exchange: Exchange, forwarded: Forwarded, outcome: Outcome
) -> None:
    """A response to a request that holds nothing itself: tasks, lists and free calls."""
    rt, method = ctx.rt, forwarded.method
    result = item.get("result")
    if method == "tasks/list":
        if isinstance(result, dict) and isinstance(result.get("tasks"), list):
            key_id = exchange.key.id
            result["tasks"] = [
                t for t in result["tasks"] if isinstance(t, dict) and rt.sessions.owns_task(key_id, t.get("taskId"))
            ]
        return
    if method in ("tasks/get", "tasks/cancel"):
        call = forwarded.call
        status = _task_status(result)
        confirmed = (method == "tasks/cancel" and status == "cancelled") or (
            method == "tasks/get" and status in ("failed", "cancelled")
        )
        if call is not None and confirmed and outcome is Outcome.SUCCESS:
            _settle(ctx, exchange, call, capture=False)
        return
    if outcome is Outcome.TASK_CREATED:  # a free call's task: bound to its key all the same
        task_id = item["result"]["task"].get("taskId")
        if isinstance(task_id, str):
            rt.sessions.bind_task(exchange.key.id, task_id, None)
        return
    if method in LIST_METHODS and rt.prices.table.has_prices(ctx.server.name):
        _annotate_list(ctx, item, method)


def _task_status(result: Any) -> str | None:
    """A task's status in a tasks/get or tasks/cancel result (the task itself, or under ``task``)."""
    if not isinstance(result, dict):
        return None
    task = result.get("task")
    status = task.get("status") if isinstance(task, dict) else result.get("status")
    return status if isinstance(status, str) else None


def _add_receipt(item: dict[str, Any], call: Call) -> None:
    result = item["result"]
    meta = result.get("_meta")
    if not isinstance(meta, dict):
        meta = result["_meta"] = {}
    meta[RECEIPT_META] = {
        "charge_id": charge_id_for(call.call_id),
        "amount_cents": format_cents(call.price),
        "balance_cents": format_cents(call.available_after),
    }


def _withhold(item: dict[str, Any], why: str) -> None:
    """Replace a priced result the gateway cannot bill with an error: it is never delivered free."""
    client_id = item.get("id")
    item.clear()
    item.update(
        jsonrpc.error_body(
            client_id,
            RESULT_WITHHELD,
            f"The result of this priced call cannot be delivered: {why}, so it was not charged",
            {"code": "result_withheld", "hint": "Call it again; you were not charged for this one"},
        )
    )


def _annotate_list(ctx: Context, item: dict[str, Any], method: str) -> bool:
    result = item.get("result")
    if not isinstance(result, dict):
        return False
    kind, list_key, name_field = LIST_METHODS[method]
    entries = result.get(list_key)
    if not isinstance(entries, list):
        return False
    table = ctx.rt.prices.table
    changed = False
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get(name_field), str):
            continue
        price = table.lookup(ctx.server.name, kind, entry[name_field])
        if price == 0:
            continue
        meta = entry.get("_meta")
        if not isinstance(meta, dict):
            meta = entry["_meta"] = {}
        meta[PRICE_META] = {"amount_cents": format_cents(price), "currency": "USD", "per": "successful call"}
        if ctx.rt.config.price_in_description:
            note = f"Costs {format_cents(price)}¢ per successful call."
            desc = entry.get("description")
            entry["description"] = f"{desc} ({note})" if isinstance(desc, str) and desc else note
        changed = True
    return changed


def _capture(ctx: Context, exchange: Exchange, captures: list[_Capture]) -> None:
    """Capture calls whose success has just been written to the client. The capture runs in a task
    owned by ``Billing`` (it survives this handler, and shutdown waits for it): the client's next
    request on this connection need not wait for the capture's fsync."""
    for capture in captures:
        _forget(ctx, exchange, capture.upstream_id, capture.forwarded)
        _settle(ctx, exchange, capture.call, capture=True)
        if capture.forwarded.task_id is not None:
            ctx.rt.sessions.task_settled(capture.forwarded.task_id)


# --- 2024-11-05 HTTP+SSE ----------------------------------------------------------------------


def _gateway_prefix(ctx: Context) -> str:
    """The path prefix under which the client reached this server (keeps a path-embedded key)."""
    key_part = f"/k/{ctx.route.path_key}" if ctx.route.path_key else ""
    host = (ctx.request.headers.get("Host") or "").lower()
    host_routed = ctx.rt.hosts.get(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    raw = ctx.request.rel_url.raw_path
    if host_routed == ctx.server.name and not raw.removeprefix(key_part).startswith(f"/{ctx.server.name}/"):
        return key_part
    return f"{key_part}/{ctx.server.name}"


async def _legacy_stream(ctx: Context) -> web.StreamResponse:
    """GET /<server>/sse: relay the upstream's SSE stream, rewriting its ``endpoint`` event so the
    client's POSTs come back through the gateway, and billing the responses it carries."""
    rt, server = ctx.rt, ctx.server
    assert server.sse_upstream is not None
    ctx.fields["method"] = "sse"
    channel_id = rt.billing.new_call_id()
    exchange = Exchange(ctx.key, scope=f"c:{channel_id}")
    upstream = await _open_upstream(ctx, "GET", server.sse_upstream, body=None, accept_sse=True)
    if upstream.status >= 300 or not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        try:
            return await _stream_raw(ctx, upstream)
        finally:
            upstream.release()

    inject: asyncio.Queue[bytes] = asyncio.Queue()

    def rewrite(event: sse.Event) -> bytes | None:
        if exchange.channel is not None or event.name != "endpoint" or event.data is None:
            return None
        target = urljoin(server.sse_upstream or "", event.data.strip())
        exchange.channel = LegacyChannel(ctx.key.id, server.name, target, events=inject)
        rt.sessions.legacy[channel_id] = exchange.channel
        return event.with_data(f"{_gateway_prefix(ctx)}/messages?channel={channel_id}")

    try:
        return await _relay_sse(ctx, upstream, exchange, rewrite=rewrite, inject=inject)
    finally:
        upstream.release()
        rt.sessions.legacy.pop(channel_id, None)
        if exchange.channel is not None:
            _void_channel(ctx, exchange, exchange.channel, list(exchange.channel.pending.items()))
        if exchange.charged:
            ctx.fields["charged_cents"] = format_cents(exchange.charged)


async def _legacy_post(ctx: Context) -> web.StreamResponse:
    """POST to the rewritten endpoint: hold priced calls, forward, and expect the answers on the
    GET stream. Refusals are delivered on that stream too, as the upstream would."""
    rt = ctx.rt
    channel_id = ctx.request.query.get("channel", "")
    channel = rt.sessions.legacy.get(channel_id)
    if channel is None or channel.key_id != ctx.key.id or channel.server != ctx.server.name:
        raise SessionNotFound("Unknown or closed SSE session", hint="Reconnect to the SSE endpoint")
    body = await _read_body(ctx.request, rt.config, ctx.deadlines)
    exchange = Exchange(ctx.key, scope=f"c:{channel_id}", channel=channel)
    incoming, forwarded = await _admit_all(ctx, body, exchange)
    for refusal in exchange.refusals:
        channel.events.put_nowait(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
    if not forwarded:
        ctx.fields["outcome"] = "refused"
        return web.Response(status=202, text="Accepted")
    sent = list(exchange.requests.items())
    exchange.requests = {}  # answered on the GET stream, which now waits for them
    for upstream_id, request in sent:
        if not channel.expect(upstream_id, request) and request.call is not None:
            _void_channel(ctx, exchange, channel, [(upstream_id, request)])
    try:
        upstream = await _open_upstream(ctx, "POST", channel.upstream_url, body=_forward_body(incoming, forwarded))
    except BaseException:
        _void_channel(ctx, exchange, channel, sent)
        raise
    try:
        if upstream.status >= 300:
            _void_channel(ctx, exchange, channel, sent)
        return await _stream_raw(ctx, upstream)
    finally:
        upstream.release()


def _void_channel(
    ctx: Context, exchange: Exchange, channel: LegacyChannel, requests: list[tuple[str, Forwarded]]
) -> None:
    """Stop waiting for these requests' answers on the channel; void the calls they held (a task's
    hold stays with its task)."""
    for upstream_id, request in requests:
        channel.pending.pop(upstream_id, None)
        ctx.rt.sessions.untrack(exchange.scope, request.client_id, upstream_id)
        if request.call is not None and request.method not in _TASK_METHODS:
            _settle(ctx, exchange, request.call, capture=False)
