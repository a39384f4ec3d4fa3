"""A developer's own MCP server monetised with the SDK, called by the official client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from gateway.examples.paid_server import build
from gateway.money import parse_cents
from gateway.sdk import AgentPay
from tests.harness import Gateway, mcp_client, run_gateway, write_config
from tests.upstream_sdk import serve_asgi


@asynccontextmanager
async def run_paid_server(pay: AgentPay) -> AsyncIterator[str]:
    async with serve_asgi(build(pay).streamable_http_app(json_response=True, stateless_http=True)) as base:
        yield f"{base}/mcp"


async def prepare(gw: Gateway, balance: str) -> tuple[str, AgentPay]:
    key = await gw.new_user("alice", balance, server="paid")
    token = await gw.ops.create_token(developer="acme", servers=["paid"])
    return key, AgentPay(str(gw.server.make_url("/")).rstrip("/"), str(token["token"]))


async def test_a_paid_tool_charges_on_success_and_not_on_failure(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"paid": None}, {})) as gw:
        key, pay = await prepare(gw, "10")
        async with pay, run_paid_server(pay) as url, mcp_client(url, key) as client:
            ok = await client.call_tool("forecast", {"city": "Oslo"})
            failed = await client.call_tool("forecast", {"city": " "})
        assert not ok.is_error and ok.content[0].text == "Sunny in Oslo"  # type: ignore[union-attr]
        assert failed.is_error
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("7.5")
        assert await gw.earnings() == parse_cents("2.5")
        charges = await gw.ledger.list_charges(developer="acme")
        assert [(c.name, c.amount) for c in charges] == [("forecast", parse_cents("2.5"))]


async def test_a_user_who_cannot_afford_the_tool_is_refused_before_it_runs(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"paid": None}, {})) as gw:
        key, pay = await prepare(gw, "2")
        async with pay, run_paid_server(pay) as url, mcp_client(url, key) as client:
            result = await client.call_tool("forecast", {"city": "Oslo"})
        assert result.is_error
        assert "insufficient_funds" in result.content[0].text  # type: ignore[union-attr]
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("2")


async def test_a_developer_server_that_dies_between_success_and_capture_leaves_nothing_half_done(
    tmp_path: Path,
) -> None:
    async with run_gateway(write_config(tmp_path, {"paid": None}, {})) as gw:
        key, pay = await prepare(gw, "10")
        held = await pay.hold(key, "2.5", "forecast", ttl_s=30)
        # The developer's process is gone before it could capture: the hold is all that exists.
        await pay.aclose()
        assert await gw.held("alice") == parse_cents("2.5")
        assert await gw.ledger.sweep(now=10**10) == 1
        await gw.verify_clean()
        assert (await gw.balance("alice"), await gw.held("alice"), await gw.earnings()) == (parse_cents("10"), 0, 0)
        assert (await gw.ledger.get_hold(held.id)).state.value == "voided"
