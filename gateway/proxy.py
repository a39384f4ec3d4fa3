"""The MCP reverse-proxy handler: authenticate → price → hold → forward → relay → capture/void.

Requests are forwarded byte-for-byte unless a priced call was refused inside a batch. Responses
are relayed untouched unless they answer a held call (a receipt is added to the result's
``_meta``) or a list whose items have prices (``io.agentpay/price`` in each item's ``_meta``).
SSE is relayed event by event. A held call is captured only after the response carrying its
success was written to the client; anything else voids it, except that a call whose resumable
stream (one with event ids) lost its client stays held until its response arrives on another
stream of the session, and a task-augmented call stays held until its ``tasks/result``.
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

from gateway import jsonrpc, sse
from gateway.config import GatewayConfig, ServerConfig
from gateway.deadlines import Deadlines
from gateway.errors import (
    PAYMENT_REQUIRED,
    BadRequest,
    BodyTooLarge,
    GatewayError,
    MethodNotAllowed,
    OriginForbidden,
    UnknownServer,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.jsonrpc import LIST_METHODS, Message, Outcome, RequestId
from gateway.keys import key_from_headers
from gateway.ledger.base import HoldOutcome, HoldRequest, HoldStatus, KeyRecord, charge_id_for
from gateway.money import format_cents
from gateway.pricing import PriceTable
from gateway.routing import Route, Router
from gateway.runtime import RUNTIME, Runtime
from gateway.sessions import Call, LegacyChannel
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
    calls: dict[RequestId, Call] = field(default_factory=dict)  # held by this request
    watched: dict[RequestId, Call] = field(default_factory=dict)  # parked calls of the session
    lists: dict[RequestId, str] = field(default_factory=dict)  # request id -> list method
    refusals: list[dict[str, Any]] = field(default_factory=list)
    charged: int = 0  # millicents captured
    resumable: bool = False  # the upstream stream carried event ids
    client_gone: bool = False

    def call_for(self, rid: RequestId) -> Call | None:
        call = self.calls.get(rid) or self.watched.get(rid)
        return call if call is not None and not call.settled else None

    @property
    def waiting(self) -> bool:
        """Whether any response in the upstream's answer still needs to be looked at."""
        return bool(self.lists) or any(not c.settled for c in (*self.calls.values(), *self.watched.values()))


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
        exchange = Exchange(key, session_id)
        if request.method == "GET":
            exchange.watched = rt.sessions.pending(session_id)
        return await _forward(ctx, exchange, body=None)
    raise MethodNotAllowed(f"Method {request.method} is not supported on an MCP endpoint", allow="POST, GET, DELETE")


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


async def _admit_all(ctx: Context, body: bytes, exchange: Exchange) -> tuple[jsonrpc.Incoming, list[Message]]:
    """Parse a POSTed body and decide, message by message, what is forwarded (holding priced calls)."""
    rt, fields = ctx.rt, ctx.fields
    incoming = jsonrpc.parse_body(body, max_batch_items=rt.config.max_batch_items)
    first = incoming.messages[0]
    fields["method"] = "batch" if incoming.is_batch else (first.method or "response")
    if not incoming.is_batch and first.has_id:
        fields["rpc_id"] = first.id
    headers = ctx.request.headers
    jsonrpc.check_routing_headers(incoming, headers.get("Mcp-Method"), headers.get("Mcp-Name"))
    table = rt.prices.table  # prices in force when the call is held are the ones charged
    forwarded: list[Message] = []
    try:
        for msg in incoming.messages:
            if await _admit(ctx, msg, table, exchange):
                forwarded.append(msg)
    except BaseException:
        _release(ctx, exchange)
        raise
    return incoming, forwarded


async def _post(ctx: Context, session_id: str | None) -> web.StreamResponse:
    body = await _read_body(ctx.request, ctx.rt.config, ctx.deadlines)
    exchange = Exchange(ctx.key, session_id, watched=ctx.rt.sessions.pending(session_id))
    incoming, forwarded = await _admit_all(ctx, body, exchange)
    if not forwarded:
        ctx.fields["outcome"] = "refused"
        value = exchange.refusals if incoming.is_batch else exchange.refusals[0]
        return web.Response(body=jsonrpc.dumps(value), content_type="application/json")
    if len(forwarded) < len(incoming.messages):
        body = jsonrpc.dumps([m.body for m in forwarded])
    return await _forward(ctx, exchange, body=body)


async def _admit(ctx: Context, msg: Message, table: PriceTable, exchange: Exchange) -> bool:
    """Decide whether one message is forwarded; place the hold of a priced call."""
    rt, server, key, fields = ctx.rt, ctx.server, ctx.key, ctx.fields
    method = msg.method
    if method in ("tasks/result", "tasks/cancel") and msg.id is not None:
        call = rt.sessions.take_task(key.id, msg.params.get("taskId"))
        if call is not None:
            if method == "tasks/result":
                exchange.calls[msg.id] = call  # its result decides the held call's fate
            else:
                call.settled = True
                rt.billing.settle(call.call_id, capture=False)
        return True
    target = msg.priced_target()
    if target is None:
        if msg.is_request and method in LIST_METHODS and msg.id is not None:
            exchange.lists[msg.id] = method
        return True
    kind, name = target
    fields.setdefault("target", name)
    price = table.lookup(server.name, kind, name)
    fields["price_cents"] = format_cents(price)
    if price == 0:
        return True
    if msg.id is None:
        raise BadRequest(
            f"A priced {method} must be a request with an id, not a notification",
            hint="Give the message an id so its result can be returned and billed",
        )
    call_id = rt.billing.new_call_id()
    outcome = await rt.billing.hold(
        HoldRequest(
            call_id=call_id,
            key_id=key.id,
            user=key.user,
            developer=server.owner,
            server=server.name,
            method=method or "",
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
        return False
    exchange.calls[msg.id] = Call(call_id, msg.id, server.name, kind, name, price, outcome.available)
    return True


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
    its stream can be resumed by the client."""
    park = exchange.client_gone and exchange.resumable and exchange.session_id is not None
    for call in exchange.calls.values():
        if call.settled or call.parked_at is not None:
            continue
        if park and exchange.session_id is not None:
            ctx.rt.sessions.park(exchange.session_id, call)
            ctx.fields["parked"] = ctx.fields.get("parked", 0) + 1
        else:
            call.settled = True
            ctx.rt.billing.settle(call.call_id, capture=False)


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
            upstream = await request.app[UPSTREAMS][server.name].request(method, url, data=body, headers=headers)
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
        if exchange.lists and not rt.prices.table.has_prices(server.name):
            exchange.lists.clear()
        if request.method == "DELETE" and upstream.status < 300 and exchange.session_id is not None:
            for call in rt.sessions.drop(exchange.session_id):
                call.settled = True
                rt.billing.settle(call.call_id, capture=False)
        content_type = upstream.headers.get("Content-Type", "")
        if upstream.status >= 300 or not (exchange.waiting or exchange.refusals):
            if upstream.status >= 500:
                fields["outcome"] = "upstream_error"
            _release(ctx, exchange)
            return await _stream_raw(ctx, upstream)
        if content_type.startswith("text/event-stream"):
            return await _relay_sse(ctx, upstream, exchange)
        return await _relay_json(ctx, upstream, exchange)
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
    to_capture: list[Call] = []
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
    """Relay an SSE stream event by event, settling held calls on the events that answer them.
    ``rewrite`` may replace an event; ``inject`` carries events the gateway adds (legacy SSE)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(_client_headers(ctx, upstream))
    await response.prepare(ctx.request)
    max_event = ctx.rt.config.max_body_bytes * 4
    parser: sse.Parser | None = sse.Parser(max_event_bytes=max_event)
    try:
        for refusal in exchange.refusals:
            await response.write(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
        async for chunk in _chunks(upstream, inject, ctx.rt.config.stream_idle_timeout_s, ctx.deadlines):
            if isinstance(chunk, _Injected):
                await response.write(chunk.data)
                continue
            if parser is None:  # nothing left to look at: relay bytes as they come
                await response.write(chunk)
                continue
            for event in parser.feed(chunk):
                if event.id is not None:
                    exchange.resumable = True
                out = rewrite(event) if rewrite is not None else None
                to_capture: list[Call] = []
                if out is None:
                    out = _process_event(ctx, event, exchange, to_capture)
                await response.write(out)
                _capture(ctx, exchange, to_capture)
            if not exchange.waiting and rewrite is None and inject is None:
                tail = parser.pending()
                parser = None
                if tail:
                    await response.write(tail)
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
    if parser is not None and parser.pending():
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


def _process_event(ctx: Context, event: sse.Event, exchange: Exchange, to_capture: list[Call]) -> bytes:
    data = event.data
    if not data or data.lstrip()[:1] not in ("{", "["):
        return event.raw
    try:
        value = jsonrpc.loads(data)
    except ValueError:
        return event.raw
    if _process_value(ctx, value, exchange, to_capture):
        return event.with_data(jsonrpc.dumps(value).decode())
    return event.raw


def _process_value(ctx: Context, value: Any, exchange: Exchange, to_capture: list[Call]) -> bool:
    changed = False
    for item in jsonrpc.responses_in(value):
        changed |= _process_response(ctx, item, exchange, to_capture)
    return changed


def _process_response(ctx: Context, item: dict[str, Any], exchange: Exchange, to_capture: list[Call]) -> bool:
    """Annotate or settle one upstream response. Returns True if ``item`` was changed."""
    rid = item.get("id")
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        return False
    call = exchange.call_for(rid)
    if call is not None:
        outcome = jsonrpc.classify_response(item)
        if outcome is Outcome.SUCCESS:
            result = item["result"]
            meta = result.get("_meta")
            if not isinstance(meta, dict):
                meta = result["_meta"] = {}
            meta[RECEIPT_META] = {
                "charge_id": charge_id_for(call.call_id),
                "amount_cents": format_cents(call.price),
                "balance_cents": format_cents(call.available_after),
            }
            to_capture.append(call)
            return True
        if outcome is Outcome.TASK_CREATED:
            task_id = item["result"]["task"].get("taskId")
            if isinstance(task_id, str):
                exchange.calls.pop(rid, None)
                ctx.rt.sessions.park_task(exchange.key.id, task_id, call)
                return False
        call.settled = True
        ctx.rt.sessions.unpark(exchange.session_id, call)
        ctx.rt.billing.settle(call.call_id, capture=False)
        return False
    list_method = exchange.lists.pop(rid, None)
    if list_method is not None:
        return _annotate_list(ctx, item, list_method)
    return False


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


def _capture(ctx: Context, exchange: Exchange, calls: list[Call]) -> None:
    """Capture calls whose success has just been written to the client. The capture runs in a task
    owned by ``Billing`` (it survives this handler, and shutdown waits for it): the client's next
    request on this connection need not wait for the capture's fsync."""
    rt, server = ctx.rt, ctx.server
    for call in calls:
        call.settled = True
        rt.sessions.unpark(exchange.session_id, call)
        rt.billing.settle(call.call_id, capture=True)
        rt.metrics.count_charge(server.name, call.price)
        exchange.charged += call.price
        ctx.fields["charge_id"] = charge_id_for(call.call_id)


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
    exchange = Exchange(ctx.key)
    channel_id = rt.billing.new_call_id()
    channel: LegacyChannel | None = None
    upstream = await _open_upstream(ctx, "GET", server.sse_upstream, body=None, accept_sse=True)
    if upstream.status >= 300 or not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        try:
            return await _stream_raw(ctx, upstream)
        finally:
            upstream.release()

    inject: asyncio.Queue[bytes] = asyncio.Queue()

    def rewrite(event: sse.Event) -> bytes | None:
        nonlocal channel
        if channel is not None or event.name != "endpoint" or event.data is None:
            return None
        target = urljoin(server.sse_upstream or "", event.data.strip())
        channel = LegacyChannel(ctx.key.id, server.name, target, events=inject)
        exchange.watched = channel.pending
        rt.sessions.legacy[channel_id] = channel
        return event.with_data(f"{_gateway_prefix(ctx)}/messages?channel={channel_id}")

    try:
        return await _relay_sse(ctx, upstream, exchange, rewrite=rewrite, inject=inject)
    finally:
        upstream.release()
        rt.sessions.legacy.pop(channel_id, None)
        if channel is not None:
            for call in channel.pending.values():
                if not call.settled:
                    call.settled = True
                    rt.billing.settle(call.call_id, capture=False)
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
    exchange = Exchange(ctx.key)
    incoming, forwarded = await _admit_all(ctx, body, exchange)
    for refusal in exchange.refusals:
        channel.events.put_nowait(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
    if not forwarded:
        ctx.fields["outcome"] = "refused"
        return web.Response(status=202, text="Accepted")
    if len(forwarded) < len(incoming.messages):
        body = jsonrpc.dumps([m.body for m in forwarded])
    for rid, call in exchange.calls.items():
        call.parked_at = time.monotonic()
        channel.pending[rid] = call
    exchange.calls = {}
    try:
        upstream = await _open_upstream(ctx, "POST", channel.upstream_url, body=body)
    except BaseException:
        _void_channel_calls(rt, channel, forwarded)
        raise
    try:
        if upstream.status >= 300:
            _void_channel_calls(rt, channel, forwarded)
        return await _stream_raw(ctx, upstream)
    finally:
        upstream.release()


def _void_channel_calls(rt: Runtime, channel: LegacyChannel, messages: list[Message]) -> None:
    for msg in messages:
        call = channel.pending.pop(msg.id, None) if msg.id is not None else None
        if call is not None and not call.settled:
            call.settled = True
            rt.billing.settle(call.call_id, capture=False)
