"""The metered form for developers charging in code: hold the most a call can cost, then capture what
it actually cost (at most the hold; the rest released). Service API and SDK, real gateway, real ledger."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from gateway.money import parse_cents
from gateway.sdk import AgentPay, AgentPayError
from tests.api.test_service_api import base_url, setup
from tests.harness import run_gateway, write_config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"tools": None}, {})


async def test_a_metered_call_holds_its_max_and_captures_what_it_cost_never_more(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw, "100")
        async with AgentPay(base_url(gw), token) as pay:
            held = await pay.hold(key, "50", "translate")  # the most one call can cost
            assert held.available_cents == Decimal("50")
            with pytest.raises(AgentPayError) as over:
                await pay.capture(held.id, "50.001")  # more than held: refused, nothing moves
            assert over.value.status == 400 and over.value.code == "invalid_input"
            assert await gw.balance("alice") == parse_cents("100")
            receipt = await pay.capture(held.id, "12.5")  # what it actually cost
            assert receipt.amount_cents == Decimal("12.5")
        assert await gw.balance("alice") == parse_cents("87.5")
        assert await gw.held("alice") == 0  # the rest of the hold was released
        await gw.verify_clean()
