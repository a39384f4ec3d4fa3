"""Price forms against requests and reports written to pay less (or charge more): a metered report in
exotic spellings (exponents, NaN, Infinity, hex, non-ASCII digits, a 30-digit number) is either the
plain decimal it says, capped at ``max``, or malformed and charged the table's price; ``by_argument``
matches exact JSON values, so another spelling of a priced value gets the base price (the developer
puts the highest price on the base, see THREAT_MODEL.md); a report in a failed call is never charged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.money import parse_cents
from tests.harness import mcp_client
from tests.proxy.test_price_forms import charged, gateway, receipt_of


@pytest.mark.parametrize(
    ("report", "amount"),
    [
        ("1e2", "5"),
        ("NaN", "5"),
        ("Infinity", "5"),
        ("0x10", "5"),
        ("\uff15", "5"),  # a fullwidth 5
        ("1_000", "5"),
        ("+3", "5"),
        (" 3 ", "3"),
        ("9" * 15, "50"),  # a plain decimal, capped at max
        ("9" * 30, "5"),  # beyond the largest amount: malformed (never more than max either way)
        ("9" * 41, "5"),  # too long to be an amount
        ("-0", "0"),
    ],
)
async def test_a_metered_report_in_an_exotic_spelling_is_charged_its_plain_value_capped_or_the_price(
    tmp_path: Path, report: str, amount: str
) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            result = await client.call_tool("translate", {"text": "hej", "report": {"amount_cents": report}})
        assert receipt_of(result)["amount_cents"] == amount
        assert await charged(gw, "alice", "100") == parse_cents(amount)
        assert await gw.held("alice") == 0
        await gw.verify_clean()


@pytest.mark.parametrize(
    "model",
    ["LARGE", "\uff4c\uff41\uff52\uff47\uff45", "large\u200b", " large", "la\u0072ge\u0301"],
    ids=["upper-case", "fullwidth", "zero-width-space", "leading-space", "combining-accent"],
)
async def test_by_argument_matches_only_the_exact_value_and_another_spelling_pays_the_base_price(
    tmp_path: Path, model: Any
) -> None:
    async with gateway(tmp_path) as (gw, _):
        key = await gw.new_user("alice", "100")
        async with mcp_client(gw.url(), key) as client:
            result = await client.call_tool("summarize", {"model": model, "pages": 0})
        assert receipt_of(result)["amount_cents"] == "2"  # the base price, not large's 10
        await gw.verify_clean()
