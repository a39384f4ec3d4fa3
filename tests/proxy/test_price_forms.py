"""Every form of the price table through the proxy: the official MCP client → the gateway → a real MCP
server (the official SDK's MCPServer), on a real SQLite ledger (PostgreSQL for the replicas).

Prices by argument, per unit (with its limit), metered by the upstream (below, at, above ``max``, no
report, a malformed report, a failing call), free allowances (across a UTC day boundary with an
injected clock, across two gateway replicas sharing one database), and N concurrent per-unit calls
against a balance that covers only some of them. Every test ends with ``ledger verify`` clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent
from structlog.testing import capture_logs

from gateway.app import create_app, server_options
from gateway.config import load_config
from gateway.errors import INVALID_PARAMS
from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import Gateway, GatewayTestServer, mcp_client, prepare_ledger, run_gateway, write_config
from tests.ledger.conftest import StoreSpec
from tests.upstream_sdk import serve_asgi

RECEIPT = "io.agentpay/receipt"
PRICE_META = "io.agentpay/price"

PRICES: dict[str, Any] = {
    "weather": {
        "tools": {
            "summarize": {
                "price": 2,
                "by_argument": [
                    {"when": {"model": "large", "fast": True}, "price": 20},
                    {"when": {"model": "large"}, "price": 10},
                ],
                "per_unit": {"argument": "pages", "price": "0.5", "max_units": 200},
            },
            "translate": {"metered": True, "max": 50, "price": 5},
            "translate_fail": {"metered": True, "max": 50, "price": 5},
            "quick": {"price": 1, "free_calls_per_day": 3},
            "quick_fail": {"price": 1, "free_calls_per_day": 3},
            "lookup": 1,
        },
        "prompts": {"brief": {"price": 1, "per_unit": {"argument": "pages", "price": 2, "max_units": 10}}},
        "resources": {"docs://pages/*": {"metered": True, "max": 3, "price": 2}},
        "default": 0,
    }
}


@dataclass
class Executions:
    """What the upstream ran to completion (a refused call must never appear here)."""

    names: list[str] = field(default_factory=list)


def build_upstream(log: Executions) -> MCPServer:
    srv = MCPServer("price-forms")

    @srv.tool()
    def summarize(model: str = "small", fast: bool = False, pages: int = 0) -> str:
        """Priced by argument (model) and per page."""
        log.names.append("summarize")
        return f"summary of {pages} pages by the {model} model"

    @srv.tool()
    def translate(text: str, report: Any = None) -> CallToolResult:
        """Metered: reports ``report`` as its io.agentpay/charge (no report when None)."""
        log.names.append("translate")
        meta = None if report is None else {"io.agentpay/charge": report}
        return CallToolResult(content=[TextContent(type="text", text=text.upper())], _meta=meta)

    @srv.tool()
    def translate_fail(text: str) -> CallToolResult:
        """Metered, and fails: its report must not be charged."""
        log.names.append("translate_fail")
        return CallToolResult(
            content=[TextContent(type="text", text="no")],
            is_error=True,
            _meta={"io.agentpay/charge": {"amount_cents": "40"}},
        )

    @srv.tool()
    def quick() -> str:
        log.names.append("quick")
        return "done"

    @srv.tool()
    def quick_fail() -> str:
        raise ValueError("the tool failed")

    @srv.tool()
    def lookup() -> str:
        log.names.append("lookup")
        return "found"

    @srv.prompt()
    def brief(pages: str) -> str:
        log.names.append("brief")
        return f"Write a brief of {pages} pages."

    @srv.resource("docs://pages/{n}")
    def page(n: str) -> str:
        log.names.append("page")
        return f"page {n}"

    return srv


@asynccontextmanager
async def upstream() -> AsyncIterator[tuple[str, Executions]]:
    log = Executions()
    async with serve_asgi(build_upstream(log).streamable_http_app()) as base:
        yield f"{base}/mcp", log


@asynccontextmanager
async def gateway(tmp_path: Path, prices: dict[str, Any] = PRICES) -> AsyncIterator[tuple[Gateway, Executions]]:
    async with upstream() as (url, log), run_gateway(write_config(tmp_path, {"weather": url}, prices)) as gw:
        yield gw, log


def receipt_of(result: Any) -> dict[str, Any]:
    return dict((result.meta or {})[RECEIPT])


async def charged(gw: Gateway, user: str, start: str) -> int:
    """Millicents ``user`` has spent since they had ``start`` cents (after settling)."""
    await gw.settled()
    return parse_cents(start) - await gw.balance(user)


# --- by argument --------------------------------------------------------------------------------
async def test_by_argument_rules_set_the_base_price_first_match_wins_and_booleans_are_not_numbers(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            small = await client.call_tool("summarize", {"model": "small", "pages": 0})
            large = await client.call_tool("summarize", {"model": "large", "pages": 0})
            fast = await client.call_tool("summarize", {"model": "large", "fast": True, "pages": 0})
            not_bool = await client.call_tool("summarize", {"model": "large", "fast": 1, "pages": 0})
        amounts = [receipt_of(r)["amount_cents"] for r in (small, large, fast, not_bool)]
        assert amounts == ["2", "10", "20", "10"]  # fast=1 is not fast=true: the second rule applies
        assert await charged(gw, "alice", "100") == parse_cents("42")
        await gw.verify_clean()


# --- per unit -----------------------------------------------------------------------------------
async def test_per_unit_adds_the_unit_price_times_the_argument_exactly_and_max_units_is_allowed(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "1000")
        async with mcp_client(gw.url(), key) as client:
            three = await client.call_tool("summarize", {"model": "small", "pages": 3})
            most = await client.call_tool("summarize", {"model": "large", "pages": 200})
        assert receipt_of(three)["amount_cents"] == "3.5"  # 2 + 0.5 x 3
        assert receipt_of(most)["amount_cents"] == "110"  # 10 + 0.5 x 200
        assert receipt_of(most)["balance_cents"] == "886.5"
        assert await charged(gw, "alice", "1000") == parse_cents("113.5")
        await gw.verify_clean()


@pytest.mark.parametrize(
    "arguments",
    [
        {"pages": 201},
        {"pages": -1},
        {"pages": True},
        {"pages": "3"},
        {"pages": 2.5},
        {"pages": None},
        {"pages": 10**30},
        {},
    ],
    ids=["over-max", "negative", "boolean", "string", "fraction", "null", "huge", "missing"],
)
async def test_a_unit_argument_that_is_not_an_allowed_integer_is_refused_before_forwarding_and_not_charged(
    tmp_path: Path, arguments: dict[str, Any]
) -> None:
    async with gateway(tmp_path) as (gw, log):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            with pytest.raises(MCPError) as refused:
                await client.call_tool("summarize", {"model": "small", **arguments})
        assert refused.value.error.code == INVALID_PARAMS
        assert "'pages'" in refused.value.error.message
        assert (refused.value.error.data or {})["argument"] == "pages"
        assert log.names == []  # never reached the upstream
        assert await charged(gw, "alice", "100") == 0
        await gw.verify_clean()


async def test_concurrent_per_unit_calls_charge_exactly_the_affordable_ones_and_never_overdraw(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (gw, log):
        key = await gw.new_user("alice", "12")  # 3 calls of 3.5¢ fit (10.5¢); the 4th would overdraw
        async with mcp_client(gw.url(), key) as client:
            results = await asyncio.gather(
                *(client.call_tool("summarize", {"model": "small", "pages": 3}) for _ in range(10))
            )
        paid = [r for r in results if not r.is_error]
        refused = [r for r in results if r.is_error]
        assert len(paid) == 3
        assert len(refused) == 7
        for r in refused:
            payment = (r.meta or {})["io.agentpay/payment_required"]
            assert payment["code"] == "insufficient_funds"
            assert payment["needed_cents"] == "3.5"
            assert "3.5¢" in r.content[0].text  # type: ignore[union-attr]
        assert log.names.count("summarize") == 3
        assert await charged(gw, "alice", "12") == parse_cents("10.5")
        assert await gw.held("alice") == 0
        await gw.verify_clean()


# --- metered ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("report", "amount", "reported"),
    [
        ({"amount_cents": "12.5"}, "12.5", None),  # below max
        ({"amount_cents": 12.5}, "12.5", None),  # a JSON number
        ({"amount_cents": "50"}, "50", None),  # at max
        ({"amount_cents": "75.001"}, "50", "75.001"),  # above max: capped, the report on the receipt
        ({"amount_cents": "0"}, "0", None),  # free by the upstream's word: nothing captured
        (None, "5", None),  # no report: the table's price
    ],
    ids=["below", "number", "at-max", "above-max", "zero", "absent"],
)
async def test_a_metered_call_is_charged_its_report_capped_at_max_or_the_price_without_one(
    tmp_path: Path, report: dict[str, Any] | None, amount: str, reported: str | None
) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "100")
        arguments: dict[str, Any] = {"text": "hej"}
        if report is not None:
            arguments["report"] = report
        async with mcp_client(gw.url(), key) as client:
            result = await client.call_tool("translate", arguments)
        assert not result.is_error
        receipt = receipt_of(result)
        assert receipt["amount_cents"] == amount
        assert receipt.get("reported_cents") == reported
        assert receipt["balance_cents"] == str(100 - float(amount)).removesuffix(".0")
        assert await charged(gw, "alice", "100") == parse_cents(amount)
        assert await gw.held("alice") == 0
        if amount != "0":
            charge = await gw.ledger.get_charge(receipt["charge_id"])
            assert charge.amount == parse_cents(amount)
        else:
            assert receipt["charge_id"] is None
        await gw.verify_clean()


@pytest.mark.parametrize(
    "report",
    [{"amount_cents": "-1"}, {"amount_cents": "1.0001"}, {"amount_cents": True}, {"amount_cents": "lots"}, "12", {}],
    ids=["negative", "four-decimals", "boolean", "text", "not-an-object", "no-amount"],
)
async def test_a_malformed_metered_report_is_charged_the_price_and_logged(tmp_path: Path, report: Any) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            with capture_logs() as logs:
                result = await client.call_tool("translate", {"text": "hej", "report": report})
        assert receipt_of(result)["amount_cents"] == "5"
        assert await charged(gw, "alice", "100") == parse_cents("5")
        warnings = [e for e in logs if e["event"] == "metered_report_malformed"]
        assert len(warnings) == 1
        assert warnings[0]["name"] == "translate"
        assert warnings[0]["charged_cents"] == "5"
        await gw.verify_clean()


async def test_a_metered_call_that_fails_charges_nothing_whatever_it_reports(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, log):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            result = await client.call_tool("translate_fail", {"text": "hej"})
        assert result.is_error
        assert log.names == ["translate_fail"]
        assert await charged(gw, "alice", "100") == 0
        assert await gw.held("alice") == 0
        await gw.verify_clean()


async def test_concurrent_metered_calls_are_each_charged_their_own_report(tmp_path: Path) -> None:
    """One call's report can never set another call's charge: each capture reads the response it settles."""
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "1000")
        amounts = [str(n) for n in range(1, 21)]
        async with mcp_client(gw.url(), key) as client:
            results = await asyncio.gather(
                *(client.call_tool("translate", {"text": a, "report": {"amount_cents": a}}) for a in amounts)
            )
        for amount, result in zip(amounts, results, strict=True):
            assert result.content[0].text == amount  # type: ignore[union-attr]
            receipt = receipt_of(result)
            assert receipt["amount_cents"] == amount
            assert (await gw.ledger.get_charge(receipt["charge_id"])).amount == parse_cents(amount)
        assert await charged(gw, "alice", "1000") == parse_cents(str(sum(range(1, 21))))
        await gw.verify_clean()


async def test_a_metered_call_needs_its_max_held_and_the_refusal_names_the_amount(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, log):
        key = await gw.new_user("alice", "20")  # the report would be 1¢, but 50¢ must be held first
        async with mcp_client(gw.url(), key) as client:
            result = await client.call_tool("translate", {"text": "hej", "report": {"amount_cents": "1"}})
        assert result.is_error
        payment = (result.meta or {})["io.agentpay/payment_required"]
        assert payment["needed_cents"] == "50"
        assert "50¢" in result.content[0].text  # type: ignore[union-attr]
        assert log.names == []
        await gw.verify_clean()


# --- prompts and resources -----------------------------------------------------------------------
async def test_prompts_count_units_from_their_string_arguments_and_resources_may_be_metered(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, log):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            await client.get_prompt("brief", {"pages": "4"})  # 1 + 2 x 4
            with pytest.raises(MCPError) as refused:
                await client.get_prompt("brief", {"pages": "11"})
            await client.read_resource("docs://pages/7")  # metered, no report: its price, 2
        assert refused.value.error.code == INVALID_PARAMS
        assert log.names == ["brief", "page"]
        assert await charged(gw, "alice", "100") == parse_cents("11")
        await gw.verify_clean()


# --- tools/list ---------------------------------------------------------------------------------
async def test_tools_list_shows_every_form_machine_readably_and_flat_prices_as_before(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "1")
        async with mcp_client(gw.url(), key) as client:
            tools = {t.name: (t.meta or {}).get(PRICE_META) for t in (await client.list_tools()).tools}
        assert tools["lookup"] == {"amount_cents": "1", "currency": "USD", "per": "successful call"}
        summarize = tools["summarize"]
        assert summarize is not None
        assert summarize["from_cents"] == "2"
        assert summarize["max_cents"] == "120"  # 20 + 0.5 x 200
        assert summarize["per_unit"] == {"argument": "pages", "price_cents": "0.5", "max_units": 200}
        assert summarize["by_argument"][0] == {"when": {"model": "large", "fast": True}, "price_cents": "20"}
        translate = tools["translate"]
        assert translate is not None
        assert (translate["metered"], translate["from_cents"], translate["max_cents"]) == (True, "0", "50")
        assert translate["price_cents"] == "5"
        assert tools["quick"] is not None and tools["quick"]["free_calls_per_day"] == 3


# --- free allowances ----------------------------------------------------------------------------
def at(day: str, clock: str) -> float:
    return datetime.fromisoformat(f"{day}T{clock}+00:00").astimezone(UTC).timestamp()


async def test_the_free_allowance_covers_the_first_calls_of_each_utc_day_and_renews_at_midnight(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (gw, _):
        now = [at("2026-03-01", "23:59:58")]
        gw.rt.billing.clock = lambda: now[0]
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            first_day = [receipt_of(await client.call_tool("quick", {})) for _ in range(4)]
            now[0] = at("2026-03-02", "00:00:00")
            second_day = [receipt_of(await client.call_tool("quick", {})) for _ in range(4)]
        for receipts in (first_day, second_day):
            assert [r["amount_cents"] for r in receipts] == ["0", "0", "0", "1"]
            assert [r.get("free_allowance", False) for r in receipts] == [True, True, True, False]
            assert [r["charge_id"] is None for r in receipts] == [True, True, True, False]
        assert await charged(gw, "alice", "100") == parse_cents("2")
        assert await gw.ledger.free_calls_used("alice", "weather", "tool:quick", "2026-03-01") == 3
        assert await gw.ledger.free_calls_used("alice", "weather", "tool:quick", "2026-03-02") == 3
        await gw.verify_clean()


async def test_a_failed_call_gives_its_free_allowance_back(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "0")  # free calls need no balance
        async with mcp_client(gw.url(), key) as client:
            for _ in range(5):
                assert (await client.call_tool("quick_fail", {})).is_error
            await gw.settled()
            day = gw.rt.billing.today()
            assert await gw.ledger.free_calls_used("alice", "weather", "tool:quick_fail", day) == 0
            assert (await client.call_tool("quick", {})).is_error is False
        await gw.verify_clean()


async def test_concurrent_calls_use_exactly_the_free_allowance_and_pay_for_the_rest(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            results = await asyncio.gather(*(client.call_tool("quick", {}) for _ in range(12)))
        amounts = sorted(receipt_of(r)["amount_cents"] for r in results)
        assert amounts == ["0"] * 3 + ["1"] * 9
        assert await charged(gw, "alice", "100") == parse_cents("9")
        await gw.verify_clean()


@asynccontextmanager
async def replica(config_path: Path) -> AsyncIterator[Gateway]:
    """One gateway application on the configured (shared) database: a replica."""
    config = load_config(config_path)
    server = GatewayTestServer(
        create_app(config), header_timeout_s=config.client_header_timeout_s, host="127.0.0.1", port=None
    )
    options = server_options(config)
    del options["handler_cancellation"]  # TestServer always sets it
    await server.start_server(**options)
    try:
        yield Gateway(config_path, server)
    finally:
        await server.close()


async def test_two_replicas_sharing_a_postgresql_database_grant_the_server_allowance_exactly_once(
    tmp_path: Path,
) -> None:
    spec = StoreSpec.fresh("postgres", tmp_path)
    prices = {"weather": {"free_calls_per_day": 4, "tools": {"lookup": 1}}}
    try:
        async with upstream() as (url, _), AsyncExitStack() as stack:
            config_path = write_config(
                tmp_path, {"weather": url}, prices, database=f"{spec.location}?schema={spec.schema}"
            )
            await prepare_ledger(config_path)
            gws = [await stack.enter_async_context(replica(config_path)) for _ in range(2)]
            key = await gws[0].new_user("alice", "100")
            clients = [await stack.enter_async_context(mcp_client(gw.url(), key)) for gw in gws]
            results = await asyncio.gather(*(clients[n % 2].call_tool("lookup", {}) for n in range(10)))
            amounts = sorted(receipt_of(r)["amount_cents"] for r in results)
            assert amounts == ["0"] * 4 + ["1"] * 6
            for gw in gws:
                await gw.settled()
            assert await gws[0].balance("alice") == parse_cents("94")
            assert await gws[1].ledger.free_calls_used("alice", "weather", "*", gws[1].rt.billing.today()) == 4
            assert await gws[0].ledger.verify() == []
    finally:
        await spec.drop()


async def test_the_demo_upstreams_metered_translate_is_charged_what_it_reports(tmp_path: Path) -> None:
    prices = {"weather": {"tools": {"translate": {"metered": True, "max": 50, "price": 5}}}}
    async with run_fault_upstream() as (url, demo), run_gateway(write_config(tmp_path, {"weather": url}, prices)) as gw:
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            short = await client.call_tool("translate", {"text": "hello", "to": "fr"})
            long = await client.call_tool("translate", {"text": "x" * 600})
        assert receipt_of(short)["amount_cents"] == "0.5"  # 0.1 cent per character
        assert receipt_of(long)["amount_cents"] == "50"  # reported 60: capped at max
        assert receipt_of(long)["reported_cents"] == "60"
        assert demo.completed == ["translate", "translate"]
        assert await charged(gw, "alice", "100") == parse_cents("50.5")
        await gw.verify_clean()


async def test_a_unit_argument_given_twice_is_priced_and_forwarded_with_one_and_the_same_value(
    tmp_path: Path,
) -> None:
    """A parser differential would let a client be priced for one value and served another: the body
    forwarded is re-encoded from what the gateway parsed and priced, so the upstream sees that value."""
    prices = {"weather": {"tools": {"add": {"price": 0, "per_unit": {"argument": "a", "price": 1, "max_units": 500}}}}}
    async with run_fault_upstream() as (url, _), run_gateway(write_config(tmp_path, {"weather": url}, prices)) as gw:
        key = await gw.new_user("alice", "1000")
        body = (
            '{"jsonrpc": "2.0", "id": 1, "method": "tools/call",'
            ' "params": {"name": "add", "arguments": {"a": 1, "b": 0, "a": 400}}}'
        )
        headers = {
            "Authorization": f"Bearer {key}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        async with aiohttp.ClientSession() as http, http.post(gw.url(), data=body, headers=headers) as resp:
            answer = await resp.json(content_type=None)
        served = int(answer["result"]["content"][0]["text"])  # the upstream's a + b, b = 0
        assert answer["result"]["_meta"][RECEIPT]["amount_cents"] == str(served)
        assert await charged(gw, "alice", "1000") == parse_cents(str(served))
        await gw.verify_clean()
