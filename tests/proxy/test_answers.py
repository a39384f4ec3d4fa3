"""Settling answers: a success being written to a client is captured by its writer and by nothing
else. A DELETE of the session, the end of the resume window or a duplicate answer cannot void it
meanwhile (that delivered the result free), and a failed write gives it back."""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

from gateway.protocol import upstream_ids
from gateway.protocol.sessions import Call, Forwarded, Sessions
from gateway.proxy import answers
from gateway.proxy.exchange import Exchange, settle_call


@dataclass
class SettleLog:
    """Stands in for ``Billing``: records what would be captured or voided in the ledger."""

    ops: list[tuple[str, bool]] = field(default_factory=list)

    def settle(self, call_id: str, *, capture: bool) -> None:
        self.ops.append((call_id, capture))


@dataclass
class World:
    clock: list[float] = field(default_factory=lambda: [0.0])
    billing: SettleLog = field(default_factory=SettleLog)
    ctx: Any = None
    key: Any = None

    def __post_init__(self) -> None:
        sessions = Sessions(window_s=300, clock=lambda: self.clock[0])
        metrics = types.SimpleNamespace(count_charge=lambda *a: None)
        prices = types.SimpleNamespace(table=types.SimpleNamespace(has_prices=lambda server: False))
        rt = types.SimpleNamespace(sessions=sessions, billing=self.billing, metrics=metrics, prices=prices)
        self.ctx = types.SimpleNamespace(rt=rt, fields={}, server=types.SimpleNamespace(name="weather"))
        self.key = types.SimpleNamespace(id="key-alice", user="alice")

    def exchange(self, session: str | None) -> Exchange:
        return Exchange(self.key, session, scope=f"s:{session}")

    def call(self, n: int, exchange: Exchange) -> tuple[str, Call]:
        call = Call(f"call-{n}", n, "weather", "tool", "get_forecast", 5_000, 0)
        call.upstream_id = upstream_ids.mint(f"{n:032x}", n, priced=True, owner=exchange.owner)
        return call.upstream_id, call


def success(upstream_id: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": upstream_id, "result": {"content": [{"type": "text", "text": "paid"}]}}


def test_a_delete_while_a_parked_calls_success_is_being_written_leaves_it_to_be_captured() -> None:
    world = World()
    upstream_id, call = world.call(1, world.exchange("S1"))
    assert world.ctx.rt.sessions.park("S1", Forwarded(1, "tools/call", call))
    resumed = world.exchange("S1")
    to_capture: list[answers.Capture] = []
    item = success(upstream_id)
    answers.process_value(world.ctx, item, resumed, to_capture)
    assert len(to_capture) == 1 and item["id"] == 1
    # the write blocks on a slow reader; meanwhile the session is deleted
    for dropped in world.ctx.rt.sessions.drop("S1"):
        settle_call(world.ctx, world.exchange("S1"), dropped, capture=False)
    assert world.billing.ops == []
    answers.capture_delivered(world.ctx, resumed, to_capture)  # the write completed
    assert world.billing.ops == [("call-1", True)] and call.captured


def test_a_success_whose_write_fails_after_its_window_ended_is_voided_not_left_held() -> None:
    world = World()
    upstream_id, call = world.call(2, world.exchange("S1"))
    assert world.ctx.rt.sessions.park("S1", Forwarded(2, "tools/call", call))
    resumed = world.exchange("S1")
    to_capture: list[answers.Capture] = []
    answers.process_value(world.ctx, success(upstream_id), resumed, to_capture)
    world.clock[0] = 1_000.0  # the resume window ends while the write is blocked
    assert world.ctx.rt.sessions.expired() == []  # not voided under its writer
    answers.delivery_failed(world.ctx, resumed, to_capture)  # then the write fails
    assert world.billing.ops == [("call-2", False)] and call.settled and not call.captured


def test_a_success_whose_write_fails_stays_held_where_it_waited() -> None:
    world = World()
    upstream_id, call = world.call(3, world.exchange("S1"))
    assert world.ctx.rt.sessions.park("S1", Forwarded(3, "tools/call", call))
    resumed = world.exchange("S1")
    to_capture: list[answers.Capture] = []
    answers.process_value(world.ctx, success(upstream_id), resumed, to_capture)
    answers.delivery_failed(world.ctx, resumed, to_capture)
    assert world.billing.ops == [] and not call.settled and not call.delivering
    assert upstream_id in world.ctx.rt.sessions.pending("S1")  # a later stream may still deliver it


def test_an_error_for_the_same_id_after_a_success_in_one_body_does_not_void_the_call() -> None:
    world = World()
    exchange = world.exchange(None)
    upstream_id, call = world.call(4, exchange)
    exchange.requests[upstream_id] = Forwarded(4, "tools/call", call)
    batch = [success(upstream_id), {"jsonrpc": "2.0", "id": upstream_id, "error": {"code": -1, "message": "x"}}]
    to_capture: list[answers.Capture] = []
    answers.process_value(world.ctx, batch, exchange, to_capture)
    answers.capture_delivered(world.ctx, exchange, to_capture)
    assert world.billing.ops == [("call-4", True)]
    assert batch[0]["result"]["_meta"]["io.agentpay/receipt"]["charge_id"]


def test_another_keys_answer_arrives_as_an_error_with_no_id() -> None:
    world = World()
    other = Exchange(types.SimpleNamespace(id="key-mallory", user="mallory"), "S2", scope="s:S2")
    upstream_id, _ = world.call(5, world.exchange("S1"))
    item = success(upstream_id)
    answers.process_value(world.ctx, item, other, [])
    assert item["id"] is None and item["error"]["data"]["code"] == "not_yours"


def test_a_priced_answer_with_both_an_error_and_a_result_loses_the_result_and_is_voided() -> None:
    world = World()
    exchange = world.exchange(None)
    upstream_id, call = world.call(6, exchange)
    exchange.requests[upstream_id] = Forwarded(6, "tools/call", call)
    item = {**success(upstream_id), "error": {"code": -32603, "message": "half-failed"}}
    to_capture: list[answers.Capture] = []
    answers.process_value(world.ctx, item, exchange, to_capture)
    assert "result" not in item and item["error"]["message"] == "half-failed" and item["id"] == 6
    assert to_capture == [] and world.billing.ops == [("call-6", False)]


def test_a_second_stream_replaying_a_result_being_delivered_gets_no_unbilled_copy() -> None:
    world = World()
    upstream_id, call = world.call(7, world.exchange("S1"))
    assert world.ctx.rt.sessions.park("S1", Forwarded(7, "tools/call", call))
    first, second = world.exchange("S1"), world.exchange("S1")  # two resumptions of the same stream
    first_capture: list[answers.Capture] = []
    answers.process_value(world.ctx, success(upstream_id), first, first_capture)
    copy = success(upstream_id)
    answers.process_value(world.ctx, copy, second, [])
    assert "result" not in copy and copy["error"]["data"]["code"] == "result_withheld" and copy["id"] == 7
    answers.delivery_failed(world.ctx, first, first_capture)  # the first write fails: nothing was delivered
    assert world.billing.ops == [] and not call.settled
