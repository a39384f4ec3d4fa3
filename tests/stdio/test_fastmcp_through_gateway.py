"""The official SDK's MCPServer run over stdio by the gateway, used through the gateway with the
official SDK's Streamable HTTP client: every MCP feature round-trips and priced calls are charged once."""

from __future__ import annotations

from pathlib import Path

import mcp.types as types
import pytest
from mcp.client.context import ClientRequestContext

from gateway.money import parse_cents
from gateway.proxy.exchange import UPSTREAMS
from gateway.stdio import StdioUpstream
from tests.harness import mcp_client, run_gateway
from tests.stdio.conftest import sdk_client, stdio_config


async def test_a_priced_tool_of_a_stdio_server_is_charged_once_and_credits_the_owner(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key, mode="legacy") as client:
            tools = await client.list_tools()
            result = await client.call_tool("get_forecast", {"city": "Oslo"})
            echoed = await client.call_tool("echo", {"message": "hi"})
        prices = {t.name: (t.meta or {}).get("io.agentpay/price") for t in tools.tools}
        assert prices["get_forecast"]["amount_cents"] == "5"  # type: ignore[index]
        assert not result.is_error
        assert result.content[0].text == "Sunny in Oslo"  # type: ignore[union-attr]
        assert (result.meta or {})["io.agentpay/receipt"]["amount_cents"] == "5"
        assert echoed.content[0].text == "hi"  # type: ignore[union-attr]
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("95")
        assert await gw.earnings("acme") == parse_cents("5")
        assert len((await gw.ledger.user_summary("alice")).recent_charges) == 1


async def test_resources_prompts_and_a_failing_tool_of_a_stdio_server_are_billed_as_for_http(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        async with sdk_client(gw.url(), key) as client:
            read = await client.read_resource("weather://alerts/north")
            prompt = await client.get_prompt("daily_brief", {"city": "Oslo"})
            failed = await client.call_tool("boom", {})
        assert read.contents[0].text == "No alerts in north"  # type: ignore[union-attr]
        assert "Oslo" in prompt.messages[0].content.text  # type: ignore[union-attr]
        assert failed.is_error
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("97")  # 1 + 2; the failed tool is free


async def test_progress_of_a_stdio_server_reaches_the_client_and_the_call_is_charged_once(tmp_path: Path) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        async with sdk_client(gw.url(), key) as client:
            result = await client.call_tool("slow_count", {"steps": 3}, progress_callback=on_progress)
        assert result.content[0].text == "counted to 3"  # type: ignore[union-attr]
        assert seen == [1, 2, 3]
        await gw.verify_clean()


async def test_sampling_and_elicitation_round_trip_through_the_gateway_and_are_charged_once(tmp_path: Path) -> None:
    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="forty-two"), model="test-model"
        )

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        async with sdk_client(gw.url(), key, sampling_callback=sampling, elicitation_callback=elicitation) as client:
            sampled = await client.call_tool("ask_llm", {"prompt": "meaning of life?"})
            elicited = await client.call_tool("ask_user", {"question": "Who are you?"})
        assert sampled.content[0].text == "LLM said: forty-two"  # type: ignore[union-attr]
        assert elicited.content[0].text == "action=accept name=Ada"  # type: ignore[union-attr]
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("96")


async def test_stateless_2026_requests_are_served_by_a_shared_warm_child_and_charged_once(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        async with sdk_client(gw.url(), key, mode="2026-07-28") as client:
            first = await client.call_tool("get_forecast", {"city": "Oslo"})
            second = await client.call_tool("get_forecast", {"city": "Rome"})
        assert first.content[0].text == "Sunny in Oslo"  # type: ignore[union-attr]
        assert second.content[0].text == "Sunny in Rome"  # type: ignore[union-attr]
        upstream = gw.server.app[UPSTREAMS]["weather"]
        assert isinstance(upstream, StdioUpstream)
        assert upstream.sessions == {} and len(upstream.shared) == 1
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("90")


async def test_the_child_sees_only_its_configured_environment_plus_path_home_and_lang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_SECRET_FOR_TEST", "must-not-leak")
    monkeypatch.setenv("FIXTURE_TOKEN_SOURCE", "expanded-value")
    config = stdio_config(tmp_path, env={"FIXTURE_TOKEN": "${FIXTURE_TOKEN_SOURCE}"})
    async with run_gateway(config) as gw:
        key = await gw.new_user("alice", "100")
        async with sdk_client(gw.url(), key) as client:
            result = await client.call_tool("environment", {})
        names, value = result.content[0].text.split("|")  # type: ignore[union-attr]
        assert value == "expanded-value"
        assert "GATEWAY_SECRET_FOR_TEST" not in names
        assert set(names.split(",")) - {"PATH", "HOME", "LANG", "FIXTURE_TOKEN", "LC_CTYPE"} == set()
