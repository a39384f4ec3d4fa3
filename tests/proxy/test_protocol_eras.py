"""Every protocol era through the gateway, with the ledger checked after each."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
from mcp import Client
from mcp.client.sse import sse_client

from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, Gateway, rpc, run_gateway, tool_call, write_config
from tests.upstream_sdk import run_upstream

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = rpc(
    "initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
)


async def post(gw: Gateway, key: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url(), json=body, headers={**ACCEPT, "Authorization": f"Bearer {key}", **(headers or {})}) as resp,
    ):
        raw = await resp.read()
        if resp.content_type == "application/json" and raw:
            return resp.status, resp.headers, json.loads(raw)
        return resp.status, resp.headers, raw.decode()


async def test_a_session_opened_with_one_key_is_unknown_to_another(tmp_path: Path) -> None:
    async with run_upstream() as up, run_gateway(write_config(tmp_path, {"weather": up.url})) as gw:
        alice = await gw.new_user("alice", "100")
        mallory = await gw.new_user("mallory", "100")
        status, headers, _ = await post(gw, alice, INIT)
        assert status == 200
        session = headers["Mcp-Session-Id"]
        status, _, body = await post(gw, mallory, tool_call("get_forecast", {"city": "x"}), {"Mcp-Session-Id": session})
        assert status == 404
        assert body["error"]["data"]["code"] == "session_not_found"
        async with aiohttp.ClientSession() as http:
            for method in ("GET", "DELETE"):
                async with http.request(
                    method,
                    gw.url(),
                    headers={**ACCEPT, "Authorization": f"Bearer {mallory}", "Mcp-Session-Id": session},
                ) as resp:
                    assert resp.status == 404
        assert up.log.completed == []
        await gw.verify_clean()
        assert await gw.balance("mallory") == parse_cents("100")


async def test_legacy_http_sse_clients_are_billed_for_replies_on_the_get_stream(tmp_path: Path) -> None:
    async with run_upstream(legacy_sse=True) as up, run_gateway(write_config(tmp_path, {"weather": up.url})) as gw:
        key = await gw.new_user("alice", "7")
        url = gw.url().removesuffix("/mcp") + "/sse"
        transport = sse_client(url, headers={"Authorization": f"Bearer {key}"})
        async with Client(transport, mode="legacy") as client:  # type: ignore[arg-type]
            paid = await client.call_tool("get_forecast", {"city": "Oslo"})
            refused = await client.call_tool("get_forecast", {"city": "Oslo"})
            free = await client.call_tool("echo", {"message": "hi"})
        assert not paid.is_error and paid.content[0].text == "Sunny in Oslo"  # type: ignore[union-attr]
        assert (paid.meta or {})["io.agentpay/receipt"]["amount_cents"] == "5"
        assert refused.is_error and "Payment required" in refused.content[0].text  # type: ignore[union-attr]
        assert free.content[0].text == "hi"  # type: ignore[union-attr]
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("2")
        assert up.log.completed.count("get_forecast") == 1


async def test_the_legacy_endpoint_event_keeps_a_path_embedded_key(tmp_path: Path) -> None:
    async with run_upstream(legacy_sse=True) as up, run_gateway(write_config(tmp_path, {"weather": up.url})) as gw:
        key = await gw.new_user("alice", "100")
        url = gw.url(path_key=key).removesuffix("/mcp") + "/sse"
        async with Client(sse_client(url), mode="legacy") as client:  # type: ignore[arg-type]
            result = await client.call_tool("get_forecast", {"city": "Oslo"})
        assert not result.is_error
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("95")


async def test_a_batch_is_priced_item_by_item_and_refused_only_where_unaffordable(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "6")
            batch = [
                tool_call("get_forecast", {"city": "a"}, rid=1),
                tool_call("get_forecast", {"city": "b"}, rid=2),
                tool_call("echo", {"message": "free"}, rid=3),
            ]
            status, _, body = await post(gw, key, batch)
            assert status == 200
            by_id = {item["id"]: item for item in body}
            assert set(by_id) == {1, 2, 3}
            paid = [i for i in (1, 2) if not by_id[i]["result"].get("isError")]
            assert len(paid) == 1
            refused = ({1, 2} - set(paid)).pop()
            assert "io.agentpay/payment_required" in by_id[refused]["result"]["_meta"]
            assert by_id[3]["result"]["content"][0]["text"] == "free"
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("1")
            assert upstream.completed.count("get_forecast") == 1


async def test_a_batch_with_duplicate_ids_is_an_invalid_request(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, upstream),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        status, _, body = await post(gw, key, [tool_call("get_forecast", rid=1), tool_call("get_forecast", rid=1)])
        assert status == 400 and body["error"]["code"] == -32600
        assert upstream.requests == []


async def test_mcp_method_header_disagreeing_with_the_body_is_a_400_with_code_32020(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, upstream),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        status, _, body = await post(gw, key, tool_call("get_forecast"), {"Mcp-Method": "tools/list"})
        assert status == 400 and body["error"]["code"] == -32020
        status, _, body = await post(
            gw, key, tool_call("get_forecast"), {"Mcp-Method": "tools/call", "Mcp-Name": "echo"}
        )
        assert status == 400 and body["error"]["code"] == -32020
        assert upstream.requests == []


async def test_unknown_mcp_param_headers_are_forwarded(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, upstream),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        headers = {
            "Mcp-Method": "tools/call",
            "Mcp-Name": "echo",
            "Mcp-Param-Region": "eu",
            "MCP-Protocol-Version": "2026-07-28",
        }
        status, _, _ = await post(gw, key, tool_call("echo", {"message": "x"}), headers)
        assert status == 200
        seen = upstream.requests[0]["headers"]
        assert seen["Mcp-Param-Region"] == "eu" and seen["MCP-Protocol-Version"] == "2026-07-28"


async def test_input_required_is_not_charged_and_the_completing_retry_is_charged_once(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, _),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        _, _, first = await post(gw, key, tool_call("ask", {}))
        assert first["result"]["resultType"] == "input_required"
        await gw.settled()
        assert await gw.balance("alice") == parse_cents("100")
        _, _, second = await post(gw, key, tool_call("ask", {"answer": "Oslo"}))
        assert second["result"]["_meta"]["io.agentpay/receipt"]["amount_cents"] == "5"
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("95")


async def test_a_task_keeps_its_hold_until_its_result_and_is_charged_once(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, _),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        created = await post(
            gw, key, rpc("tools/call", {"name": "get_forecast", "arguments": {"city": "x"}, "task": {}})
        )
        task_id = created[2]["result"]["task"]["taskId"]
        await gw.settled_except(1)
        assert await gw.held("alice") == parse_cents("5")
        _, _, result = await post(gw, key, rpc("tasks/result", {"taskId": task_id}, rid=2))
        assert result["result"]["_meta"]["io.agentpay/receipt"]["amount_cents"] == "5"
        await gw.verify_clean()
        assert (await gw.balance("alice"), await gw.held("alice")) == (parse_cents("95"), 0)


async def test_a_cancelled_task_is_not_charged(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, _),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        created = await post(gw, key, rpc("tools/call", {"name": "get_forecast", "arguments": {}, "task": {}}))
        task_id = created[2]["result"]["task"]["taskId"]
        await post(gw, key, rpc("tasks/cancel", {"taskId": task_id}, rid=2))
        await gw.verify_clean()
        assert (await gw.balance("alice"), await gw.held("alice")) == (parse_cents("100"), 0)


async def test_a_resumable_stream_keeps_the_hold_across_a_disconnect_and_charges_the_replayed_response_once(
    tmp_path: Path,
) -> None:
    async with run_upstream(resumable=True) as up, run_gateway(write_config(tmp_path, {"weather": up.url})) as gw:
        key = await gw.new_user("alice", "100")
        auth = {**ACCEPT, "Authorization": f"Bearer {key}"}
        async with httpx2.AsyncClient(timeout=10) as http:
            init = await http.post(gw.url(), json=INIT, headers=auth)
            session = {**auth, "Mcp-Session-Id": init.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
            await http.post(gw.url(), json=rpc("notifications/initialized", rid=None), headers=session)
            last_id = None
            async with http.stream(
                "POST", gw.url(), json=tool_call("wait_for_release", rid=7), headers=session
            ) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("id:"):
                        last_id = line.partition(":")[2].strip()
                        break
            assert last_id is not None  # the priming event: this stream can be resumed
            async with asyncio.timeout(10):
                await up.log.started.wait()
            await gw.settled_except(1)
            assert await gw.held("alice") == parse_cents("5")  # parked, not voided
            up.log.release.set()
            replayed = []
            async with http.stream("GET", gw.url(), headers={**session, "Last-Event-ID": last_id}) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data:") and '"id":7' in line.replace(" ", ""):
                        replayed.append(json.loads(line.partition(":")[2]))
                        break
        assert replayed[0]["result"]["_meta"]["io.agentpay/receipt"]["amount_cents"] == "5"
        await gw.verify_clean()
        assert (await gw.balance("alice"), await gw.held("alice")) == (parse_cents("95"), 0)
