"""Nothing is charged unless the upstream's success was delivered: every failure mode voids the hold."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, Gateway, run_gateway, tool_call, write_config
from tests.upstream_sdk import run_upstream

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def post(gw: Gateway, key: str, body: Any, **kw: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.url(), json=body, headers={**HEADERS, "Authorization": f"Bearer {key}"}, **kw) as resp,
    ):
        raw = await resp.read()
        if resp.content_type != "application/json" or not raw:
            return resp.status, raw.decode(errors="replace")
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode(errors="replace")


@pytest.mark.parametrize("sse", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize(
    ("tool", "expected_status"),
    [
        ("rpc_error", 200),
        ("tool_error", 200),
        ("fail_500", 500),
        ("garbage", 200),
        ("truncate", 200),
        ("reset", 502),
        ("no_such_tool", 200),
    ],
)
async def test_a_failed_upstream_call_is_never_charged(
    tmp_path: Path, sse: bool, tool: str, expected_status: int
) -> None:
    async with run_fault_upstream(sse=sse) as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            status, _ = await post(gw, key, tool_call(tool))
            assert status == expected_status or (sse and tool in ("rpc_error", "tool_error", "no_such_tool"))
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")
            assert await gw.earnings() == 0
            assert upstream.completed == []


async def test_an_upstream_timeout_is_a_504_and_charges_nothing(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _):
        config = write_config(
            tmp_path, {"weather": url}, FAULT_PRICES, server_options={"weather": {"read_timeout_s": 0.2}}
        )
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            status, body = await post(gw, key, tool_call("slow", {"seconds": 3}))
            assert status == 504
            assert body["error"]["data"]["code"] == "upstream_timeout"
            assert "weather" in body["error"]["message"]
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")


async def test_an_unreachable_upstream_is_a_502_naming_the_server(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _):
        pass  # the port is closed now
    async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
        key = await gw.new_user("alice", "100")
        status, body = await post(gw, key, tool_call("get_forecast", {"city": "Oslo"}))
        assert status == 502
        assert body["error"]["data"]["code"] == "upstream_unavailable"
        assert "'weather'" in body["error"]["message"]
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("100")


@pytest.mark.parametrize("json_response", [True, False], ids=["json", "sse"])
async def test_a_client_that_disconnects_before_the_response_is_not_charged(
    tmp_path: Path, json_response: bool
) -> None:
    async with run_upstream(json_response=json_response, stateless=True) as up:
        async with run_gateway(write_config(tmp_path, {"weather": up.url})) as gw:
            key = await gw.new_user("alice", "100")
            call = asyncio.create_task(post(gw, key, tool_call("wait_for_release")))
            async with asyncio.timeout(10):
                await up.log.started.wait()
            assert (await gw.held("alice")) == parse_cents("5")
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")
            assert (await gw.held("alice")) == 0


async def test_concurrent_calls_never_overdraw_the_balance(tmp_path: Path) -> None:
    price, balance, calls = parse_cents("5"), parse_cents("37"), 100
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "37")
            results = await asyncio.gather(
                *(post(gw, key, tool_call("get_forecast", {"city": str(i)}, rid=1)) for i in range(calls))
            )
            paid = [body for status, body in results if status == 200 and not body["result"].get("isError")]
            refused = [body for status, body in results if status == 200 and body["result"].get("isError")]
            assert len(paid) == balance // price == 7
            assert len(refused) == calls - 7
            assert all("io.agentpay/payment_required" in body["result"]["_meta"] for body in refused)
            await gw.verify_clean()
            assert await gw.balance("alice") == balance - 7 * price
            assert await gw.earnings() == 7 * price
            assert len(upstream.completed) == 7
