"""Reading a client's body and deciding, message by message, what is forwarded: priced calls are held,
every request gets the gateway's own id, and refusals are answered by the gateway itself.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.billing.pricing import Price, PriceTable
from gateway.billing.rules import BadUnits, PriceRule
from gateway.config import GatewayConfig
from gateway.errors import (
    INVALID_PARAMS,
    PAYMENT_REQUIRED,
    BadRequest,
    BodyTooLarge,
    GatewayError,
)
from gateway.ledger.base import FreeCall, HoldOutcome, HoldRequest, HoldStatus
from gateway.money import format_cents
from gateway.protocol import jsonrpc, upstream_ids
from gateway.protocol.jsonrpc import Message
from gateway.protocol.sessions import Call, Forwarded
from gateway.proxy.deadlines import Deadlines
from gateway.proxy.exchange import PAYMENT_META, TASK_METHODS, Context, Exchange, release_calls

_SMALLER_BODY = "Send a smaller request"


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


async def read_body(request: web.Request, config: GatewayConfig, deadlines: Deadlines) -> bytes:
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


async def admit_all(ctx: Context, body: bytes, exchange: Exchange) -> tuple[jsonrpc.Incoming, list[dict[str, Any]]]:
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
        release_calls(ctx, exchange)
        raise
    return incoming, forwarded


def forward_body(incoming: jsonrpc.Incoming, forwarded: list[dict[str, Any]]) -> bytes:
    return jsonrpc.dumps(forwarded if incoming.is_batch else forwarded[0])


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
        if method in TASK_METHODS:
            raise BadRequest(f"{method} must be a request with an id", hint="Give the message a string or integer id")
        if _price_of(ctx, msg, table) != 0:
            raise BadRequest(
                f"A priced {method} must be a request with an id, not a notification",
                hint="Give the message an id so its result can be returned and billed",
            )
        return msg.body
    forwarded = Forwarded(msg.id, method)
    if method in TASK_METHODS and method != "tasks/list":
        task_id = msg.params.get("taskId")
        task = rt.sessions.task_of(key.id, task_id)
        if task is None or not isinstance(task_id, str):  # unknown here, or another key's: never forwarded
            exchange.refusals.append(_task_not_found(msg))
            return None
        forwarded.task_id = task_id
        forwarded.call = task.call
        rt.sessions.touch_task(task_id)  # its owner is still waiting for it: the hold stays
    else:
        price = _price_of(ctx, msg, table)
        if price:
            # a flat price is held as it is (no quote object on that path: it stays as cheap as it was)
            held = (price, None) if isinstance(price, int) else _quote(ctx, msg, price, exchange)
            if held is None:
                return None  # refused: its arguments cannot be priced
            if held[0]:
                call = await _hold(ctx, msg, held, _allowance(ctx, table, price), exchange)
                if call is None:
                    return None
                forwarded.call = call
    call = forwarded.call
    own_call = call if method not in TASK_METHODS else None  # a tasks/result's call is its task's
    nonce = own_call.call_id if own_call is not None else rt.billing.new_call_id()
    upstream_id = upstream_ids.mint(nonce, msg.id, priced=call is not None, owner=exchange.owner)
    if own_call is not None:
        own_call.upstream_id = upstream_id
    exchange.requests[upstream_id] = forwarded
    rt.sessions.track(exchange.scope, msg.id, upstream_id)
    return {**msg.body, "id": upstream_id}


def _price_of(ctx: Context, msg: Message, table: PriceTable) -> Price:
    target = msg.priced_target()
    if target is None:
        return 0
    kind, name = target
    ctx.fields.setdefault("target", name)
    price = table.price_of(ctx.server.name, kind, name)
    if isinstance(price, int):
        ctx.fields["price_cents"] = format_cents(price)
    return price


def _quote(ctx: Context, msg: Message, price: PriceRule, exchange: Exchange) -> tuple[int, int | None] | None:
    """(what a request priced by a rule is held for, a metered call's price without a report); None
    (and a -32602 refusal, nothing charged) when the argument its price counts units of is missing,
    not a non-negative integer, or over the limit."""
    arguments = msg.params.get("arguments")
    if not isinstance(arguments, dict):
        arguments = {}
    try:
        quote = price.quote(arguments, strings_count=msg.method == "prompts/get")
    except BadUnits as exc:
        ctx.rt.metrics.refusals.labels(server=ctx.server.name, reason="invalid_units").inc()
        hint = "Send the argument as a JSON integer within the limit shown in the tool's io.agentpay/price"
        data = {"code": "invalid_units", "argument": exc.argument, "hint": hint}
        exchange.refusals.append(jsonrpc.error_body(msg.id, INVALID_PARAMS, exc.message, data))
        return None
    ctx.fields["price_cents"] = format_cents(quote.hold)
    return quote.hold, quote.price if quote.metered else None


def _allowance(ctx: Context, table: PriceTable, price: Price) -> tuple[int, bool]:
    """(free calls per day, whether they are the name's own) for a call at ``price``: the name's
    own allowance when its rule has one, else the server's. 0: no allowance."""
    if not isinstance(price, int) and price.free_calls_per_day is not None:
        return price.free_calls_per_day, True
    return table.prices_of(ctx.server.name).free_calls_per_day, False


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


async def _hold(
    ctx: Context, msg: Message, held: tuple[int, int | None], allowance: tuple[int, bool], exchange: Exchange
) -> Call | None:
    """Hold the price of a priced request (or use its free allowance); None (and a refusal) when the
    balance or cap refuses it."""
    rt, server, key = ctx.rt, ctx.server, ctx.key
    kind, name = msg.priced_target() or ("tool", "")
    call_id = rt.billing.new_call_id()
    assert msg.id is not None
    limit, own = allowance
    if limit and await rt.billing.claim_free(
        FreeCall(call_id, key.user, server.name, f"{kind}:{name}" if own else "*", name, rt.billing.today(), limit)
    ):
        ctx.fields["free_call"] = True
        return Call(call_id, msg.id, server.name, kind, name, 0, 0, free=True)
    price, metered_price = held
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
        exchange.refusals.append(
            _payment_refusal(
                msg, kind, name, price, outcome, rt.config, modern=modern, metered=metered_price is not None
            )
        )
        return None
    return Call(call_id, msg.id, server.name, kind, name, price, outcome.available, metered_price=metered_price)


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
    metered: bool = False,
) -> dict[str, Any]:
    topup = config.topup_url or "ask the gateway operator to top up your AgentPay balance"
    if outcome.status is HoldStatus.SPEND_LIMIT:
        left = format_cents(outcome.spend_remaining or 0)
        code, reason = "spend_limit_reached", f"this API key has {left}¢ left of its spending limit"
        what_to_do = "Ask the gateway operator to raise the key's limit or issue a new key."
    else:
        code = "insufficient_funds"
        reason = f"your available AgentPay balance is {format_cents(outcome.available)}¢"
        if outcome.available < 0:  # a clawback (a card payment refunded or disputed) after the money was spent
            reason += " (below zero: a card payment was refunded or disputed after its credit was spent)"
        what_to_do = f"To continue, top up: {topup}."
    label = {"tool": "Calling tool", "resource": "Reading resource", "prompt": "Getting prompt"}[kind]
    costs = f"needs {format_cents(price)}¢ held (the most it can cost)" if metered else f"costs {format_cents(price)}¢"
    text = f"Payment required: {label} {name!r} {costs} and {reason}. {what_to_do}"
    data: dict[str, Any] = {
        "code": code,
        "price_cents": format_cents(price),
        "needed_cents": format_cents(price),
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
