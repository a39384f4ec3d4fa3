"""The upstream's answers: each response gets its client's id back, and is settled, bound (tasks),
annotated (lists) or withheld. Captures happen only after the success was written to the client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from gateway.billing.rules import parse_report
from gateway.errors import RESULT_WITHHELD
from gateway.ledger.base import charge_id_for
from gateway.money import format_cents
from gateway.protocol import jsonrpc, sse, upstream_ids
from gateway.protocol.jsonrpc import LIST_METHODS, Outcome
from gateway.protocol.sessions import Call, Forwarded
from gateway.proxy.exchange import PRICE_META, RECEIPT_META, TASK_METHODS, Context, Exchange, settle_call


@dataclass(slots=True, frozen=True)
class Capture:
    """A call to capture once the response carrying its success has been written."""

    upstream_id: str
    forwarded: Forwarded
    call: Call


_OUR_ID = '"' + upstream_ids.PREFIX
log = structlog.get_logger("gateway.proxy.answers")


def process_event(ctx: Context, event: sse.Event, exchange: Exchange, to_capture: list[Capture]) -> bytes:
    data = event.data
    if not data or data.lstrip()[:1] not in ("{", "[") or (_OUR_ID not in data and "\\u" not in data):
        return event.raw  # no id the gateway minted can be in it (as written, or escaped)
    try:
        value = jsonrpc.loads(data)
    except ValueError:
        return event.raw
    if process_value(ctx, value, exchange, to_capture):
        return event.with_data(jsonrpc.dumps(value).decode())
    return event.raw


def process_value(ctx: Context, value: Any, exchange: Exchange, to_capture: list[Capture]) -> bool:
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
    if forwarded.call is not None and forwarded.method not in TASK_METHODS:
        ctx.rt.sessions.unpark(exchange.session_id, forwarded.call)


def _process_response(ctx: Context, item: dict[str, Any], exchange: Exchange, to_capture: list[Capture]) -> bool:
    """Give one upstream response its client's id back, and settle, bind, annotate or withhold what
    it carries. Returns True if ``item`` was changed."""
    upstream_id = item.get("id")
    decoded = upstream_ids.decode(upstream_id)
    if decoded is None:
        return False  # not an id the gateway minted (an upstream's own notification-like answer)
    assert isinstance(upstream_id, str)
    item["id"] = decoded.client_id
    if decoded.owner != exchange.owner:  # another key's answer, replayed onto this stream upstream
        _withhold(item, "it answers a request made with another API key", code="not_yours")
        item["id"] = None  # not the other client's id: it must not answer a request of this one
        return True
    if decoded.priced and "error" in item:
        item.pop("result", None)  # an error is not billed, so what else it carries is not delivered
    forwarded = _lookup(ctx, exchange, upstream_id)
    outcome = jsonrpc.classify_response(item)
    if forwarded is None:
        if decoded.priced and outcome in _DELIVERS_VALUE:
            _withhold(
                item,
                "this stream cannot bill it (the call was made on another stream or process, or its hold was released)",
            )
        return True
    call = forwarded.call
    method = forwarded.method
    if call is None or method in ("tasks/get", "tasks/cancel", "tasks/list"):
        _forget(ctx, exchange, upstream_id, forwarded)
        _answer_unpriced(ctx, item, exchange, forwarded, outcome)
        return True
    if call.delivering:  # a second answer while its success is being written: that write decides
        # Not relayed: if that write failed, this copy would have reached the client unbilled.
        _withhold(item, "the same call's result is being delivered on another stream")
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
            settle_call(ctx, exchange, call, capture=False)
        return True
    if outcome is Outcome.SUCCESS:
        if call.metered_price is not None:
            _meter(ctx, item, call)
        _add_receipt(item, call)
        call.claim_for_delivery()  # from now on only the writer settles it (``capture_delivered``)
        to_capture.append(Capture(upstream_id, forwarded, call))  # forgotten once captured
        return True
    _forget(ctx, exchange, upstream_id, forwarded)
    if method == "tasks/result":
        if outcome is Outcome.TOOL_ERROR:  # the task ran and failed
            settle_call(ctx, exchange, call, capture=False)
        return True  # anything else leaves the task's hold to the task
    if outcome is Outcome.TASK_CREATED:
        task_id = item["result"]["task"].get("taskId")
        if isinstance(task_id, str) and ctx.rt.sessions.bind_task(exchange.key.id, task_id, call):
            return True  # held until the task's result is delivered, or it fails or is cancelled
        _withhold(item, "the task it created could not be tracked")
    settle_call(ctx, exchange, call, capture=False)
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
            settle_call(ctx, exchange, call, capture=False)
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


def _meter(ctx: Context, item: dict[str, Any], call: Call) -> None:
    """What a metered call's success costs, from the report in THIS result (the one about to be
    delivered and captured; never another response's): the report capped at the hold, or the
    table's price when there is none or it is malformed (logged)."""
    assert call.metered_price is not None
    reported, problem = parse_report(item["result"])
    call.reported = None
    if reported is None:
        call.charge = call.metered_price
        if problem is not None:
            log.warning(
                "metered_report_malformed",
                server=call.server,
                name=call.name,
                call_id=call.call_id,
                problem=problem,
                charged_cents=format_cents(call.metered_price),
            )
        return
    call.charge = min(reported, call.price)
    if reported > call.price:
        call.reported = reported
        log.warning(
            "metered_report_capped",
            server=call.server,
            name=call.name,
            call_id=call.call_id,
            reported_cents=format_cents(reported),
            max_cents=format_cents(call.price),
        )


def _add_receipt(item: dict[str, Any], call: Call) -> None:
    result = item["result"]
    meta = result.get("_meta")
    if not isinstance(meta, dict):
        meta = result["_meta"] = {}
    amount = call.amount
    receipt: dict[str, Any] = {
        "charge_id": charge_id_for(call.call_id) if amount else None,  # nothing charged: no charge
        "amount_cents": format_cents(amount),
    }
    if call.free:
        receipt["free_allowance"] = True  # the balance was not read: nothing was held
    else:
        receipt["balance_cents"] = format_cents(call.available_after + call.price - amount)
    if call.reported is not None:
        receipt["reported_cents"] = format_cents(call.reported)
    meta[RECEIPT_META] = receipt


def _withhold(item: dict[str, Any], why: str, *, code: str = "result_withheld") -> None:
    """Replace a result the gateway must not deliver here with an error: a priced result it cannot
    bill is never delivered free, and another key's answer is never shown to this one."""
    client_id = item.get("id")
    item.clear()
    if code == "not_yours":
        message = f"This response is not delivered: {why}"
        hint = "Resume only streams of your own session, with event ids it gave you"
    else:
        message = f"The result of this priced call cannot be delivered: {why}, so it was not charged"
        hint = "Call it again; you were not charged for this one"
    item.update(jsonrpc.error_body(client_id, RESULT_WITHHELD, message, {"code": code, "hint": hint}))


def _annotate_list(ctx: Context, item: dict[str, Any], method: str) -> bool:
    result = item.get("result")
    if not isinstance(result, dict):
        return False
    kind, list_key, name_field = LIST_METHODS[method]
    entries = result.get(list_key)
    if not isinstance(entries, list):
        return False
    prices = ctx.rt.prices.table.prices_of(ctx.server.name)
    free_calls = prices.free_calls_per_day
    changed = False
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get(name_field), str):
            continue
        price = prices.price_of(kind, entry[name_field])
        if price == 0:
            continue
        meta = entry.get("_meta")
        if not isinstance(meta, dict):
            meta = entry["_meta"] = {}
        if isinstance(price, int):
            shown: dict[str, Any] = {"amount_cents": format_cents(price)}
            note = f"Costs {format_cents(price)}¢ per successful call."
        else:
            shown = price.describe()
            note = f"Costs {shown['from_cents']}¢ to {shown['max_cents']}¢ per successful call."
        shown.update(currency="USD", per="successful call")
        if free_calls and "free_calls_per_day" not in shown:
            shown["free_calls_per_day"] = free_calls
        meta[PRICE_META] = shown
        if ctx.rt.config.price_in_description:
            desc = entry.get("description")
            entry["description"] = f"{desc} ({note})" if isinstance(desc, str) and desc else note
        changed = True
    return changed


def delivery_failed(ctx: Context, exchange: Exchange, captures: list[Capture]) -> None:
    """The write of these successes failed: the calls are held again where they waited (parked,
    or this request's own, which the request's end parks or voids), or voided when they were
    dropped or their window ended meanwhile."""
    for capture in captures:
        if capture.call.delivery_failed():
            settle_call(ctx, exchange, capture.call, capture=False)


def capture_delivered(ctx: Context, exchange: Exchange, captures: list[Capture]) -> None:
    """Capture calls whose success has just been written to the client. The capture runs in a task
    owned by ``Billing`` (it survives this handler, and shutdown waits for it): the client's next
    request on this connection need not wait for the capture's fsync."""
    for capture in captures:
        _forget(ctx, exchange, capture.upstream_id, capture.forwarded)
        settle_call(ctx, exchange, capture.call, capture=True)
        if capture.forwarded.task_id is not None:
            ctx.rt.sessions.task_settled(capture.forwarded.task_id)
