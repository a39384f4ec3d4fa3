"""The MCP reverse-proxy handler: authenticate → price → hold → forward → relay → capture/void.

Requests are forwarded byte-for-byte unless a priced call was refused inside a batch. Responses
are relayed untouched unless they answer a held call (a receipt is added to the result's
``_meta``) or a list whose items have prices (``io.agentpay/price`` in each item's ``_meta``).
SSE is relayed event by event. A held call is captured only after the response carrying its
success was written to the client; anything else voids it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from gateway import jsonrpc, sse
from gateway.billing import charge_id_for, new_call_id
from gateway.config import GatewayConfig, ServerConfig
from gateway.errors import (
    PAYMENT_REQUIRED,
    BadRequest,
    BodyTooLarge,
    GatewayError,
    OriginForbidden,
    UnknownServer,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.jsonrpc import LIST_METHODS, Message, Outcome, RequestId
from gateway.keys import key_from_headers
from gateway.ledger.base import HoldOutcome, HoldRequest, HoldStatus, KeyRecord
from gateway.money import format_cents
from gateway.pricing import PriceTable
from gateway.routing import resolve
from gateway.runtime import RUNTIME, Runtime
from gateway.upstream import ForwardedFor, downstream_headers, upstream_headers

LOG_FIELDS: web.RequestKey[dict[str, Any]] = web.RequestKey("log_fields", dict)
PRICE_META = "io.agentpay/price"
RECEIPT_META = "io.agentpay/receipt"
PAYMENT_META = "io.agentpay/payment_required"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(slots=True)
class Call:
    """One held, priced request inside a POST."""

    call_id: str
    msg: Message
    kind: str
    name: str
    price: int
    available_after: int
    settled: bool = False


@dataclass(slots=True)
class Exchange:
    """What one POST is waiting for in the upstream's answer."""

    calls: dict[RequestId, Call] = field(default_factory=dict)
    lists: dict[RequestId, str] = field(default_factory=dict)  # request id -> list method
    refusals: list[dict[str, Any]] = field(default_factory=list)
    charged: int = 0  # millicents captured

    @property
    def waiting(self) -> bool:
        """Whether any response in the upstream's answer still needs to be looked at."""
        return bool(self.lists) or any(not call.settled for call in self.calls.values())

    @property
    def needs_parsing(self) -> bool:
        return bool(self.calls or self.lists)


async def handle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    fields = request[LOG_FIELDS]
    route = resolve(
        request.headers.get("Host"),
        request.rel_url.raw_path,
        servers=rt.config.servers.keys(),
        hosts=_hosts(rt.config),
    )
    server = rt.config.servers[route.server]
    fields["server"] = server.name
    _check_origin(request.headers.get("Origin"), server, rt.config)
    key = await rt.auth.authenticate(route.path_key or key_from_headers(request.headers), server.name)
    fields["key"] = key.prefix
    if server.upstream is None:
        raise UnknownServer(
            f"Server {server.name!r} is integrated through the AgentPay SDK and has no MCP endpoint here",
            hint="Call the developer's own server URL",
        )
    if route.endpoint != "mcp":
        raise UnknownServer(f"Endpoint {route.endpoint!r} is not served for {server.name!r}")
    _check_session(request, rt, key)
    if request.method == "POST":
        return await _post(request, rt, server, key)
    if request.method in ("GET", "DELETE"):
        fields["method"] = request.method
        return await _relay_plain(request, rt, server, key, body=None)
    raise BadRequest(f"Method {request.method} is not supported on an MCP endpoint", hint="Use POST, GET or DELETE")


def _hosts(config: GatewayConfig) -> dict[str, str]:
    return {host.lower(): name for name, srv in config.servers.items() for host in srv.hosts}


def _check_origin(origin: str | None, server: ServerConfig, config: GatewayConfig) -> None:
    if origin is None or origin in config.allowed_origins:
        return
    host = urlsplit(origin).hostname
    if host is not None and (host in _LOOPBACK or host in server.hosts):
        return
    raise OriginForbidden(
        f"Requests from origin {origin!r} are not allowed",
        hint="Add the origin to allowed_origins in the gateway config if it is legitimate",
    )


def _check_session(request: web.Request, rt: Runtime, key: KeyRecord) -> None:
    session = request.headers.get("Mcp-Session-Id")
    if session is None:
        return
    owner = rt.sessions.get(session)
    if owner is None:
        rt.sessions[session] = key.id  # first sight after a gateway restart: bind it now
    elif owner != key.id:
        raise SessionNotFound("Session not found", hint="Start a new session (initialize) with your own key")


class SessionNotFound(GatewayError):
    code = "session_not_found"
    http_status = 404
    jsonrpc_code = -32001


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(
            f"The request body is {request.content_length} bytes; the limit is {limit}",
            hint="Send a smaller request",
        )
    chunks = bytearray()
    async for chunk in request.content.iter_any():
        chunks += chunk
        if len(chunks) > limit:
            raise BodyTooLarge(f"The request body exceeds the limit of {limit} bytes", hint="Send a smaller request")
    return bytes(chunks)


async def _post(request: web.Request, rt: Runtime, server: ServerConfig, key: KeyRecord) -> web.StreamResponse:
    fields = request[LOG_FIELDS]
    body = await _read_body(request, rt.config.max_body_bytes)
    incoming = jsonrpc.parse_body(body, max_batch_items=rt.config.max_batch_items)
    first = incoming.messages[0]
    fields["method"] = "batch" if incoming.is_batch else (first.method or "response")
    if not incoming.is_batch and first.has_id:
        fields["rpc_id"] = first.id
    jsonrpc.check_routing_headers(incoming, request.headers.get("Mcp-Method"), request.headers.get("Mcp-Name"))

    table = rt.prices.table  # prices in force when the call is held are the ones charged
    exchange = Exchange()
    forwarded: list[Message] = []
    try:
        for msg in incoming.messages:
            if await _admit(msg, rt, table, server, key, exchange, fields):
                forwarded.append(msg)
    except BaseException:
        _void_all(rt, exchange)
        raise
    if not forwarded:
        fields["outcome"] = "refused"
        return await _write_json(request, exchange.refusals if incoming.is_batch else exchange.refusals[0], 200)
    if len(forwarded) < len(incoming.messages):
        body = jsonrpc.dumps([m.body for m in forwarded])
    return await _relay_plain(request, rt, server, key, body=body, exchange=exchange)


async def _admit(
    msg: Message,
    rt: Runtime,
    table: PriceTable,
    server: ServerConfig,
    key: KeyRecord,
    exchange: Exchange,
    fields: dict[str, Any],
) -> bool:
    """Decide whether one message is forwarded; place the hold of a priced call."""
    target = msg.priced_target()
    if target is None:
        method = msg.method
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
            f"A priced {msg.method} must be a request with an id, not a notification",
            hint="Give the message an id so its result can be returned and billed",
        )
    call_id = new_call_id()
    fee = price * server.fee_basis_points // 10_000
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
            fee=fee,
            lease_s=rt.config.hold_lease_s,
            owner=rt.billing.owner,
        )
    )
    if not outcome.ok:
        rt.metrics.refusals.labels(server=server.name, reason=outcome.status.value).inc()
        exchange.refusals.append(_payment_refusal(msg, kind, name, price, outcome, rt.config))
        return False
    exchange.calls[msg.id] = Call(call_id, msg, kind, name, price, outcome.available)
    return True


def _payment_refusal(
    msg: Message, kind: str, name: str, price: int, outcome: HoldOutcome, config: GatewayConfig
) -> dict[str, Any]:
    topup = config.topup_url or "ask the gateway operator to top up your AgentPay balance"
    if outcome.status is HoldStatus.SPEND_LIMIT:
        remaining = outcome.spend_remaining or 0
        code, reason = (
            "spend_limit_reached",
            (f"this API key has {format_cents(remaining)}¢ left of its spending limit"),
        )
        what_to_do = "Ask the gateway operator to raise the key's limit or issue a new key."
    else:
        code, reason = "insufficient_funds", f"your available AgentPay balance is {format_cents(outcome.available)}¢"
        what_to_do = f"To continue, top up: {topup}."
    label = {"tool": "Calling tool", "resource": "Reading resource", "prompt": "Getting prompt"}[kind]
    text = f"Payment required: {label} {name!r} costs {format_cents(price)}¢ and {reason}. {what_to_do}"
    data = {
        "code": code,
        "price_cents": format_cents(price),
        "available_cents": format_cents(outcome.available),
        "topup_url": config.topup_url,
    }
    if outcome.spend_remaining is not None:
        data["spend_remaining_cents"] = format_cents(outcome.spend_remaining)
    if kind == "tool":
        return jsonrpc.result_body(
            msg.id, {"content": [{"type": "text", "text": text}], "isError": True, "_meta": {PAYMENT_META: data}}
        )
    return jsonrpc.error_body(msg.id, PAYMENT_REQUIRED, text, data)


def _void_all(rt: Runtime, exchange: Exchange) -> None:
    for call in exchange.calls.values():
        if not call.settled:
            call.settled = True
            rt.billing.settle(call.call_id, capture=False)


def _forwarded_for(request: web.Request, rt: Runtime) -> ForwardedFor:
    peer = request.remote
    trusted = peer is not None and peer in rt.config.trusted_proxies
    return ForwardedFor(
        client_ip=peer,
        proto=(request.headers.get("X-Forwarded-Proto") if trusted else None) or request.scheme,
        host=(request.headers.get("X-Forwarded-Host") if trusted else None) or request.headers.get("Host"),
        prior_chain=request.headers.get("X-Forwarded-For") if trusted else None,
    )


async def _relay_plain(
    request: web.Request,
    rt: Runtime,
    server: ServerConfig,
    key: KeyRecord,
    *,
    body: bytes | None,
    exchange: Exchange | None = None,
) -> web.StreamResponse:
    exchange = exchange or Exchange()
    fields = request[LOG_FIELDS]
    session = rt.upstreams[server.name]
    assert server.upstream is not None
    url = server.upstream
    if request.rel_url.query_string:
        url = f"{url}?{request.rel_url.query_string}"
    headers = upstream_headers(request.headers, forwarded=_forwarded_for(request, rt), extra=server.upstream_headers)
    started = time.perf_counter()
    upstream: aiohttp.ClientResponse | None = None
    try:
        try:
            async with asyncio.timeout(server.read_timeout_s):
                upstream = await session.request(request.method, url, data=body, headers=headers, allow_redirects=False)
        except TimeoutError:
            raise UpstreamTimeout(f"Server {server.name!r} did not answer within {server.read_timeout_s:g}s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"Server {server.name!r} is unreachable ({type(exc).__name__})") from None
        rt.metrics.upstream_latency.labels(server=server.name).observe(time.perf_counter() - started)
        fields["upstream_status"] = upstream.status
        if exchange.lists and not _has_prices(rt, server):
            exchange.lists.clear()
        session_id = upstream.headers.get("Mcp-Session-Id")
        if session_id is not None and request.method == "POST":
            rt.sessions.setdefault(session_id, key.id)
        if request.method == "DELETE" and upstream.status < 300:
            sid = request.headers.get("Mcp-Session-Id")
            if sid is not None:
                rt.sessions.pop(sid, None)
        content_type = upstream.headers.get("Content-Type", "")
        if upstream.status >= 300 or not (exchange.needs_parsing or exchange.refusals):
            if upstream.status >= 500:
                fields["outcome"] = "upstream_error"
            _void_all(rt, exchange)
            return await _stream_raw(request, upstream)
        if content_type.startswith("text/event-stream"):
            return await _relay_sse(request, rt, server, upstream, exchange)
        return await _relay_json(request, rt, server, upstream, exchange)
    finally:
        _void_all(rt, exchange)
        if upstream is not None:
            upstream.release()
        _count(request, rt, exchange)


def _has_prices(rt: Runtime, server: ServerConfig) -> bool:
    return rt.prices.table.has_prices(server.name)


def _count(request: web.Request, rt: Runtime, exchange: Exchange) -> None:
    fields = request[LOG_FIELDS]
    if exchange.charged:
        fields["charged_cents"] = format_cents(exchange.charged)
    if "outcome" not in fields:
        fields["outcome"] = "charged" if exchange.charged else ("refused" if exchange.refusals else "ok")


async def _stream_raw(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Relay status, headers and body untouched, chunk by chunk as they arrive."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_headers(upstream.headers.items()))
    content_length = upstream.headers.get("Content-Length")
    if content_length is not None:
        response.content_length = int(content_length)
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        request[LOG_FIELDS]["outcome"] = "upstream_broke_stream"
        return response
    await response.write_eof()
    return response


async def _relay_json(
    request: web.Request,
    rt: Runtime,
    server: ServerConfig,
    upstream: aiohttp.ClientResponse,
    exchange: Exchange,
) -> web.StreamResponse:
    try:
        async with asyncio.timeout(server.read_timeout_s):
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
            changed = False
            for item in jsonrpc.responses_in(value):
                changed |= _process_response(item, rt, server, exchange, to_capture)
            if exchange.refusals:
                value = (value if isinstance(value, list) else [value]) + exchange.refusals
                changed = True
            if changed:
                raw = jsonrpc.dumps(value)
    elif exchange.refusals:
        raw = jsonrpc.dumps(exchange.refusals)
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_headers(upstream.headers.items()))
    response.content_length = len(raw)
    await response.prepare(request)
    await response.write(raw)
    await response.write_eof()
    await _capture(request, rt, server, exchange, to_capture)
    return response


async def _relay_sse(
    request: web.Request,
    rt: Runtime,
    server: ServerConfig,
    upstream: aiohttp.ClientResponse,
    exchange: Exchange,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(downstream_headers(upstream.headers.items()))
    await response.prepare(request)
    for refusal in exchange.refusals:
        await response.write(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
    parser: sse.Parser | None = sse.Parser(max_event_bytes=rt.config.max_body_bytes * 4)
    try:
        async for chunk in upstream.content.iter_any():
            if parser is None:  # nothing left to look at: relay bytes as they come
                await response.write(chunk)
                continue
            for event in parser.feed(chunk):
                to_capture: list[Call] = []
                out = event.raw
                data = event.data
                if data and data.lstrip()[:1] in ("{", "["):
                    try:
                        value = jsonrpc.loads(data)
                    except ValueError:
                        value = None
                    if value is not None:
                        changed = False
                        for item in jsonrpc.responses_in(value):
                            changed |= _process_response(item, rt, server, exchange, to_capture)
                        if changed:
                            out = event.with_data(jsonrpc.dumps(value).decode())
                await response.write(out)
                await _capture(request, rt, server, exchange, to_capture)
            if not exchange.waiting:
                tail = parser.pending()
                parser = None
                if tail:
                    await response.write(tail)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, sse.EventTooLarge) as exc:
        request[LOG_FIELDS]["outcome"] = "upstream_broke_stream"
        request[LOG_FIELDS]["error"] = type(exc).__name__
        return response
    if parser is not None and parser.pending():
        await response.write(parser.pending())
    await response.write_eof()
    return response


def _process_response(
    item: dict[str, Any], rt: Runtime, server: ServerConfig, exchange: Exchange, to_capture: list[Call]
) -> bool:
    """Annotate or settle one upstream response. Returns True if ``item`` was changed."""
    rid = item.get("id")
    if not isinstance(rid, str | int):
        return False
    call = exchange.calls.get(rid)
    if call is not None and not call.settled:
        outcome = jsonrpc.classify_response(item)
        if outcome is Outcome.SUCCESS:
            result = item["result"]
            meta = result.get("_meta")
            if not isinstance(meta, dict):
                meta = {}
                result["_meta"] = meta
            meta[RECEIPT_META] = {
                "charge_id": charge_id_for(call.call_id),
                "amount_cents": format_cents(call.price),
                "balance_cents": format_cents(call.available_after),
            }
            to_capture.append(call)
            return True
        call.settled = True
        rt.billing.settle(call.call_id, capture=False)
        return False
    list_method = exchange.lists.pop(rid, None)
    if list_method is not None:
        return _annotate_list(item, list_method, rt, server)
    return False


def _annotate_list(item: dict[str, Any], method: str, rt: Runtime, server: ServerConfig) -> bool:
    result = item.get("result")
    if not isinstance(result, dict):
        return False
    kind, list_key, name_field = LIST_METHODS[method]
    entries = result.get(list_key)
    if not isinstance(entries, list):
        return False
    table = rt.prices.table
    changed = False
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get(name_field), str):
            continue
        price = table.lookup(server.name, kind, entry[name_field])
        if price == 0:
            continue
        meta = entry.get("_meta")
        if not isinstance(meta, dict):
            meta = {}
            entry["_meta"] = meta
        meta[PRICE_META] = {"amount_cents": format_cents(price), "currency": "USD", "per": "successful call"}
        if rt.config.price_in_description:
            note = f"Costs {format_cents(price)}¢ per successful call."
            desc = entry.get("description")
            entry["description"] = f"{desc} ({note})" if isinstance(desc, str) and desc else note
        changed = True
    return changed


async def _capture(
    request: web.Request, rt: Runtime, server: ServerConfig, exchange: Exchange, calls: list[Call]
) -> None:
    """Capture calls whose success has just been written to the client."""
    if not calls:
        return
    tasks = []
    for call in calls:
        call.settled = True
        tasks.append(rt.billing.settle(call.call_id, capture=True))
        rt.metrics.charges.labels(server=server.name).inc()
        rt.metrics.charged_millicents.labels(server=server.name).inc(call.price)
        exchange.charged += call.price
        request[LOG_FIELDS]["charge_id"] = charge_id_for(call.call_id)
    await asyncio.shield(asyncio.gather(*tasks))


async def _write_json(request: web.Request, value: Any, status: int) -> web.StreamResponse:
    return web.Response(body=jsonrpc.dumps(value), status=status, content_type="application/json")
