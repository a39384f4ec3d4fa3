"""Regression tests for the ways an adversarial review got priced results for free.

Root cause of most: any upstream response whose JSON-RPC id matched a held call settled that call,
whichever request produced it (ids are the client's, so a client can make two requests share one);
and task handling failed open. Each test drives real upstreams through a real gateway with raw
HTTP, then checks the money invariant (``client.money_problems``): every priced result a client
received was charged exactly once, to its owner, no client received another user's result, and
``ledger verify`` is clean — and then the specific behaviour the fix promises.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from gateway.money import parse_cents
from tests.adversarial.client import (
    Arena,
    arena,
    call,
    error_code,
    is_success,
    is_withheld,
    receipt_of,
)
from tests.adversarial.upstreams import ResultLog, run_scripted_upstream, run_sdk_upstream, tokens_in
from tests.clients.npm import NodeTools, NpmUnavailable, ensure_installed
from tests.harness import rpc
from tests.test_real_clients import run_everything

DECOY = "no_such_tool"  # unknown tools cost nothing (default 0): the decoy is free to send


def priced_result_for(rid: Any) -> Any:
    """A predicate: the message is a priced result (it carries a result token) for ``rid``."""
    return lambda m: isinstance(m, dict) and m.get("id") == rid and is_success(m) and bool(tokens_in(m))


async def assert_charged(a: Arena, user: str, cents: str, *, held: str = "0") -> None:
    await a.gw.settled()
    assert (await a.gw.balance(user), await a.gw.held(user)) == (parse_cents(cents), parse_cents(held))


# --- 1. legacy HTTP+SSE: a same-id decoy -------------------------------------------------------------


async def test_a_same_id_decoy_on_the_legacy_sse_channel_cannot_void_a_held_call(tmp_path: Path) -> None:
    async with run_sdk_upstream(legacy_sse=True) as up, arena(tmp_path, up.url) as a:
        alice = a.peers["alice"]
        async with alice.legacy_channel() as (stream, endpoint):
            sent = await alice.post(call("slow", 777, tag="alice", gate="g"), url=endpoint)
            assert sent.status == 202
            await up.gates.started("g")
            assert (await alice.post(call(DECOY, 777), url=endpoint)).status == 202
            decoy = await stream.until_id(777)  # the decoy's failure, while the priced call still runs
            up.gates.release("g")
            real = await stream.until(priced_result_for(777))
        await a.assert_money_ok(up.log)
        assert not is_success(decoy) and not tokens_in(decoy)
        receipt = receipt_of(real)
        assert receipt is not None and receipt["amount_cents"] == "5"
        await assert_charged(a, "alice", "95")


# --- 2. resumable stream: a decoy with the id of a parked call ------------------------------------------


async def test_a_decoy_with_the_id_of_a_parked_call_cannot_void_it_and_its_replay_is_charged(tmp_path: Path) -> None:
    async with run_sdk_upstream(resumable=True) as up, arena(tmp_path, up.url) as a:
        alice = a.peers["alice"]
        await alice.open_session()
        async with alice.post_stream(call("slow", 7, tag="alice", gate="g")) as stream:
            priming = await stream.next_event()
            assert priming is not None and priming.id is not None  # this stream can be resumed
            await up.gates.started("g")
            stream.cut()
        await a.gw.settled_except(1)
        assert await a.gw.held("alice") == parse_cents("5")  # parked, waiting for a resumption
        decoy = await alice.post(call(DECOY, 7))
        up.gates.release("g")
        await up.gates.finished("g")
        async with alice.get_stream(last_event_id=priming.id) as replay:
            real = await replay.until(priced_result_for(7))
        await a.assert_money_ok(up.log)
        [answer] = decoy.by_id(7)
        assert not is_success(answer) and not tokens_in(answer)  # the decoy got its own failure
        receipt = receipt_of(real)
        assert receipt is not None and receipt["amount_cents"] == "5"
        await assert_charged(a, "alice", "95")


# --- 3. tasks/cancel that the upstream refuses -------------------------------------------------------------


async def test_a_task_cancel_the_upstream_refuses_leaves_the_task_held_and_its_result_is_charged(
    tmp_path: Path,
) -> None:
    async with run_scripted_upstream() as (url, up), arena(tmp_path, url) as a:
        alice = a.peers["alice"]
        created = await alice.post(call("slow", 1, task=True, tag="alice", gate="t"))
        task_id = created.body["result"]["task"]["taskId"]
        up.gates.release("t")
        await up.task_done(task_id)
        cancel = await alice.post(rpc("tasks/cancel", {"taskId": task_id}, 2))
        result = await alice.post(rpc("tasks/result", {"taskId": task_id}, 3))
        await a.assert_money_ok(up.log)
        assert error_code(cancel.body)[0] == -32602  # the spec's answer for a terminal task, relayed
        [answer] = result.by_id(3)
        assert tokens_in(answer), answer
        receipt = receipt_of(answer)
        assert receipt is not None and receipt["amount_cents"] == "5"
        await assert_charged(a, "alice", "95")


async def test_a_task_cancel_the_upstream_confirms_voids_the_hold(tmp_path: Path) -> None:
    async with run_scripted_upstream() as (url, up), arena(tmp_path, url) as a:
        alice = a.peers["alice"]
        created = await alice.post(call("slow", 1, task=True, tag="alice", gate="t"))
        task_id = created.body["result"]["task"]["taskId"]
        await a.gw.settled_except(1)
        assert await a.gw.held("alice") == parse_cents("5")
        cancel = await alice.post(rpc("tasks/cancel", {"taskId": task_id}, 2))
        assert cancel.body["result"]["status"] == "cancelled"
        up.gates.release("t")
        await a.gw.settled()
        await a.assert_money_ok(up.log)
        await assert_charged(a, "alice", "100")


# --- 4. task results outside the creating key ---------------------------------------------------------------


async def test_a_task_result_is_given_only_to_the_key_that_created_the_task(tmp_path: Path) -> None:
    users = {"alice": "100", "mallory": "100"}
    async with run_scripted_upstream() as (url, up), arena(tmp_path, url, users) as a:
        alice, mallory = a.peers["alice"], a.peers["mallory"]
        alice_2 = await a.another_key("alice")

        async def task() -> str:
            created = await alice.post(call("paid", 1, task=True, tag="alice"))
            task_id: str = created.body["result"]["task"]["taskId"]
            await up.task_done(task_id)
            return task_id

        by_null_id, by_notification, by_other_key, by_other_user = tasks = [await task() for _ in range(4)]
        null_id = await alice.post(
            {"jsonrpc": "2.0", "id": None, "method": "tasks/result", "params": {"taskId": by_null_id}}
        )
        notification = await alice.post(rpc("tasks/result", {"taskId": by_notification}, rid=None))
        refused = [
            await peer.post(rpc(method, {"taskId": task_id}, 2))
            for peer, task_id in ((alice_2, by_other_key), (mallory, by_other_user))
            for method in ("tasks/result", "tasks/get", "tasks/cancel")
        ]
        lists = {
            name: await peer.post(rpc("tasks/list", {}, 3))
            for name, peer in (("alice", alice), ("alice_2", alice_2), ("mallory", mallory))
        }
        forwarded = [m["method"] for m in up.flat_requests() if m.get("method", "").startswith("tasks/")]
        # The owner then fetches every result with the key that created the task: each charged once.
        paid = [await alice.post(rpc("tasks/result", {"taskId": task_id}, 10 + n)) for n, task_id in enumerate(tasks)]
        await a.assert_money_ok(up.log)
        assert (null_id.status, error_code(null_id.body)[0]) == (400, -32600)
        assert (notification.status, error_code(notification.body)[0]) == (400, -32600)
        for reply in refused:
            assert reply.status == 200
            assert error_code(reply.body) == (-32602, "task_not_found"), reply.body
        assert [m for m in forwarded if m != "tasks/list"] == []  # refused at the gateway, never forwarded
        listed = {name: {t["taskId"] for t in reply.body["result"]["tasks"]} for name, reply in lists.items()}
        assert listed["alice"] == set(tasks)
        assert listed["alice_2"] == listed["mallory"] == set()
        for n, reply in enumerate(paid):
            [answer] = reply.by_id(10 + n)
            receipt = receipt_of(answer)
            assert tokens_in(answer) and receipt is not None and receipt["amount_cents"] == "5"
        await assert_charged(a, "alice", "80")
        await assert_charged(a, "mallory", "100")


# --- 5. batch decoys ---------------------------------------------------------------------------------------

ID_ONLY = {"jsonrpc": "2.0", "id": 1}
RESPONSE_SHAPED = {"jsonrpc": "2.0", "id": 1, "result": {}}
ERROR_SHAPED = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "decoy"}}


async def test_a_batch_with_an_id_only_decoy_is_refused_whole_and_nothing_is_forwarded(tmp_path: Path) -> None:
    async with run_scripted_upstream(lenient=True) as (url, up), arena(tmp_path, url) as a:
        reply = await a.peers["alice"].post([ID_ONLY, call("paid", 1, tag="alice")])
        await a.assert_money_ok(up.log)
        assert reply.status == 400 and error_code(reply.body)[0] == -32600
        assert up.requests == [] and up.log.minted == {}
        await assert_charged(a, "alice", "100")


@pytest.mark.parametrize("decoy", [RESPONSE_SHAPED, ERROR_SHAPED], ids=["response-shaped", "error-shaped"])
async def test_a_batch_decoy_answering_to_the_id_of_a_priced_call_cannot_void_it(
    tmp_path: Path, decoy: dict[str, Any]
) -> None:
    async with run_scripted_upstream(lenient=True) as (url, up), arena(tmp_path, url) as a:
        reply = await a.peers["alice"].post([decoy, call("paid", 1, tag="alice")])
        await a.assert_money_ok(up.log)
        if reply.status == 400:  # refused whole: then nothing may have been forwarded or charged
            assert error_code(reply.body)[0] == -32600
            assert up.requests == []
            await assert_charged(a, "alice", "100")
        else:
            [real] = [m for m in reply.messages if priced_result_for(1)(m)]
            receipt = receipt_of(real)
            assert receipt is not None and receipt["amount_cents"] == "5"
            await assert_charged(a, "alice", "95")


# --- 6. a stream cut before its first event id ----------------------------------------------------------------


async def test_a_call_cut_before_its_first_event_id_stays_held_and_a_replay_by_a_reused_id_is_never_free(
    tmp_path: Path,
) -> None:
    async with run_sdk_upstream(resumable=True) as up, arena(tmp_path, up.url) as a:
        alice = a.peers["alice"]
        await alice.open_session("2025-06-18")  # before 2025-11-25: no priming events
        async with alice.post_stream(call("echo", 5, message="free")) as free:
            await free.until_id(5)
            learned = free.last_id  # an event id of this session, from a free call
        assert learned is not None
        async with alice.post_stream(call("slow", 5, tag="alice", gate="g")) as stream:
            await up.gates.started("g")
            stream.cut()  # nothing with an event id has arrived
        await a.gw.settled_except(1)
        held_after_cut = await a.gw.held("alice")
        up.gates.release("g")
        await up.gates.finished("g")
        assert up.events is not None
        async with alice.get_stream(last_event_id=learned) as replay:
            await up.events.replays.reached(1)
            assert await alice.delete() == 200  # ends the session, and with it the replay stream
            await replay.drain()
        await a.assert_money_ok(up.log)
        assert held_after_cut == parse_cents("5")  # parked, not voided


async def test_a_call_cut_before_its_first_event_id_is_charged_when_its_response_comes_on_a_later_stream(
    tmp_path: Path,
) -> None:
    async with run_scripted_upstream(sse=True) as (url, up), arena(tmp_path, url) as a:
        alice = a.peers["alice"]
        await alice.open_session()
        async with alice.post_stream(call("slow", 9, tag="alice", gate="g")) as stream:
            await up.gates.started("g")
            stream.cut()
        await up.disconnects.reached(1)
        await a.gw.settled_except(1)
        held_after_cut = await a.gw.held("alice")
        up.gates.release("g")
        await up.undelivered.reached(1)
        async with alice.get_stream() as later:
            await later.drain()
        await a.assert_money_ok(up.log)
        assert held_after_cut == parse_cents("5")
        real = [m for m in later.messages if priced_result_for(9)(m)]
        assert len(real) == 1
        receipt = receipt_of(real[0])
        assert receipt is not None and receipt["amount_cents"] == "5"
        await assert_charged(a, "alice", "95")


async def test_a_response_arriving_after_the_resume_window_is_withheld_not_delivered_free(tmp_path: Path) -> None:
    async with (
        run_scripted_upstream(sse=True) as (url, up),
        arena(tmp_path, url, resume_window_s=0.3, sweep_interval_s=0.05) as a,
    ):
        alice = a.peers["alice"]
        await alice.open_session()
        async with alice.post_stream(call("slow", 9, tag="alice", gate="g")) as stream:
            await up.gates.started("g")
            stream.cut()
        await up.disconnects.reached(1)
        await assert_charged(a, "alice", "100")  # voided once the window ended
        up.gates.release("g")
        await up.undelivered.reached(1)
        async with alice.get_stream() as later:
            await later.drain()
        await a.assert_money_ok(up.log)
        assert a.observer.tokens_received() == set()
        [withheld] = [m for m in later.messages if isinstance(m, dict) and m.get("id") == 9]
        assert is_withheld(withheld), withheld
        await assert_charged(a, "alice", "100")


# --- 7. ids beyond 2**53 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rid", [2**63 + 5, 2**70, 2**53 + 1, -(2**63) - 1], ids=["2^63+5", "2^70", "2^53+1", "-2^63-1"]
)
async def test_an_id_an_upstream_cannot_echo_exactly_still_gets_its_result_charged_under_its_own_id(
    tmp_path: Path, rid: int
) -> None:
    async with run_scripted_upstream(lenient=True) as (url, up), arena(tmp_path, url) as a:
        reply = await a.peers["alice"].post(call("paid", rid, tag="alice"))
        await a.assert_money_ok(up.log)
        [message] = reply.messages
        assert message["id"] == rid and type(message["id"]) is int
        receipt = receipt_of(message)
        assert tokens_in(message) and receipt is not None and receipt["amount_cents"] == "5"
        assert all(isinstance(seen, str) for seen in up.ids_seen())  # gateway-owned ids upstream
        await assert_charged(a, "alice", "95")


# --- 3 and 4 against a real tasks implementation: npm @modelcontextprotocol/server-everything ---------------


@pytest.fixture(scope="module")
def node() -> NodeTools:
    try:
        return ensure_installed()
    except NpmUnavailable as exc:
        pytest.skip(f"npm packages unavailable: {exc}")


@pytest.mark.timeout(180)
async def test_server_everything_a_finished_task_whose_cancel_it_refuses_is_charged_once_and_only_to_its_owner(
    node: NodeTools, tmp_path: Path
) -> None:
    log = ResultLog()  # the research topic is the token: the report quotes it
    prices = {"weather": {"tools": {"simulate-research-query": "5"}, "default": 0}}
    users = {"alice": "100", "mallory": "100"}
    async with (
        run_everything(node, tmp_path / "everything.log") as base,
        arena(tmp_path, f"{base}/mcp", users, prices=prices) as a,
    ):
        alice, mallory = a.peers["alice"], a.peers["mallory"]
        await alice.open_session()
        await mallory.open_session()
        token = log.mint("simulate-research-query", "alice")
        async with alice.get_stream() as notes:  # server-everything announces task status changes here
            created = await alice.post(call("simulate-research-query", 1, task=True, topic=token))
            [answer] = created.by_id(1)
            task_id = answer["result"]["task"]["taskId"]
            stolen = await mallory.post(rpc("tasks/result", {"taskId": task_id}, 2))
            await notes.until(
                lambda m: (
                    isinstance(m, dict)
                    and m.get("method") == "notifications/tasks/status"
                    and m["params"].get("taskId") == task_id
                    and m["params"].get("status") == "completed"
                )
            )
        cancel = await alice.post(rpc("tasks/cancel", {"taskId": task_id}, 3))
        result = await alice.post(rpc("tasks/result", {"taskId": task_id}, 4))
        await a.assert_money_ok(log)
        [refusal] = cancel.by_id(3)
        assert error_code(refusal)[0] == -32602  # "Cannot cancel task in terminal status: completed"
        [paid] = result.by_id(4)
        receipt = receipt_of(paid)
        assert token in tokens_in(paid) and receipt is not None and receipt["amount_cents"] == "5"
        [not_mallorys] = stolen.by_id(2)
        assert error_code(not_mallorys) == (-32602, "task_not_found")
        await assert_charged(a, "alice", "95")
        await assert_charged(a, "mallory", "100")


# --- found by the fuzzer on the old code ---------------------------------------------------------------------


async def test_two_priced_calls_with_one_id_on_a_legacy_channel_are_each_charged_and_neither_hold_is_stranded(
    tmp_path: Path,
) -> None:
    async with run_sdk_upstream(legacy_sse=True) as up, arena(tmp_path, up.url) as a:
        alice = a.peers["alice"]
        async with alice.legacy_channel() as (stream, endpoint):
            for gate in ("g1", "g2"):
                assert (await alice.post(call("slow", "a", tag="alice", gate=gate), url=endpoint)).status == 202
                await up.gates.started(gate)
            up.gates.release("g1")
            up.gates.release("g2")
            await stream.until(priced_result_for("a"))
            await stream.until(priced_result_for("a"))
        await a.assert_money_ok(up.log)
        await assert_charged(a, "alice", "90")


async def test_two_concurrent_priced_calls_with_one_id_in_one_session_are_each_charged_once(tmp_path: Path) -> None:
    async with run_sdk_upstream(resumable=True) as up, arena(tmp_path, up.url) as a:
        alice = a.peers["alice"]
        await alice.open_session()
        async with (
            alice.post_stream(call("slow", 1, tag="alice", gate="g1")) as first,
            alice.post_stream(call("slow", 1, tag="alice", gate="g2")) as second,
        ):
            await up.gates.started("g1")
            await up.gates.started("g2")
            up.gates.release("g1")
            up.gates.release("g2")
            answers = await asyncio.gather(
                first.until(priced_result_for(1)), second.until(priced_result_for(1)), return_exceptions=True
            )
        await a.assert_money_ok(up.log)
        assert [isinstance(answer, dict) for answer in answers] == [True, True], answers  # each on its stream
        await assert_charged(a, "alice", "90")


async def test_a_resumption_with_another_sessions_event_id_never_delivers_that_sessions_result(tmp_path: Path) -> None:
    # The SDK's event store is shared by every session of the server and replays by event id alone:
    # a client that presents another session's event id is replayed that session's stream.
    users = {"alice": "100", "mallory": "100"}
    async with run_sdk_upstream(resumable=True) as up, arena(tmp_path, up.url, users) as a:
        alice, mallory = a.peers["alice"], a.peers["mallory"]
        await alice.open_session()
        await mallory.open_session()
        async with alice.post_stream(call("slow", 1, tag="alice", gate="g")) as stream:
            priming = await stream.next_event()
            assert priming is not None and priming.id is not None
            await up.gates.started("g")
            stream.cut()
        await a.gw.settled_except(1)
        up.gates.release("g")
        await up.gates.finished("g")  # alice's result is in the event store
        assert up.events is not None
        async with mallory.get_stream(last_event_id=priming.id) as stolen:
            await up.events.replays.reached(1)
            assert await mallory.delete() == 200  # ends mallory's session and the replay stream
            await stolen.drain()
        async with alice.get_stream(last_event_id=priming.id) as resumed:
            await resumed.until(priced_result_for(1))
        await a.assert_money_ok(up.log)
        assert a.observer.tokens_received("mallory") == set()
        await assert_charged(a, "alice", "95")
        await assert_charged(a, "mallory", "100")
