"""End to end: the official MCP client → gateway → the official SDK's server, with a real SQLite ledger."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.money import parse_cents
from tests.harness import mcp_client, run_gateway, write_config
from tests.upstream_sdk import RunningUpstream


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_a_priced_call_debits_its_price_and_credits_the_owner(
    tmp_path: Path, sdk_upstream: RunningUpstream, mode: str
) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": sdk_upstream.url})) as gw:
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key, mode=mode) as client:
            result = await client.call_tool("get_forecast", {"city": "Oslo"})
        assert not result.is_error
        assert result.content[0].text == "Sunny in Oslo"  # type: ignore[union-attr]
        receipt = (result.meta or {})["io.agentpay/receipt"]
        assert receipt["amount_cents"] == "5"
        assert receipt["balance_cents"] == "95"
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("95")
        assert await gw.earnings("acme") == parse_cents("5")
        charge = (await gw.ledger.user_summary("alice")).recent_charges[0]
        assert charge.id == receipt["charge_id"]


async def test_free_calls_and_listing_tools_charge_nothing(tmp_path: Path, sdk_upstream: RunningUpstream) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": sdk_upstream.url})) as gw:
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            tools = await client.list_tools()
            echoed = await client.call_tool("echo", {"message": "hi"})
        assert echoed.content[0].text == "hi"  # type: ignore[union-attr]
        prices = {t.name: (t.meta or {}).get("io.agentpay/price") for t in tools.tools}
        assert prices["get_forecast"]["amount_cents"] == "5"  # type: ignore[index]
        assert prices["premium_report"]["amount_cents"] == "25"  # type: ignore[index]
        assert prices["echo"] is None
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("100")


async def test_a_tool_that_fails_is_not_charged(tmp_path: Path, sdk_upstream: RunningUpstream) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": sdk_upstream.url})) as gw:
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            result = await client.call_tool("boom", {})
        assert result.is_error
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("100")
        assert await gw.earnings() == 0


async def test_resources_and_prompts_are_priced_by_uri_and_name(tmp_path: Path, sdk_upstream: RunningUpstream) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": sdk_upstream.url})) as gw:
        key = await gw.new_user("alice", "10")
        async with mcp_client(gw.url(), key) as client:
            await client.read_resource("weather://alerts/north")
            await client.get_prompt("daily_brief", {"city": "Oslo"})
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("7")
