"""The demo's stdio server (``gateway/ops/demo_stdio.py``, standard library only) as the demo config
runs it: behind the gateway, through the official SDK client, billed."""

from __future__ import annotations

import sys
from pathlib import Path

from gateway.config import load_config
from gateway.money import parse_cents
from tests.harness import run_gateway, write_config
from tests.stdio.conftest import REPO, sdk_client


def test_the_demo_config_runs_the_demo_stdio_server_from_the_repository() -> None:
    config = load_config(REPO / "config" / "gateway.yaml", env={})
    stdio = config.servers["demo-stdio"].stdio
    assert stdio is not None and config.servers["demo-stdio"].upstream is None
    assert stdio.command == ("python3", "gateway/ops/demo_stdio.py") and stdio.cwd == REPO
    assert (REPO / stdio.command[1]).exists()


async def test_the_demo_stdio_server_works_through_the_gateway_and_its_calls_are_billed(tmp_path: Path) -> None:
    prices = {"demo-stdio": {"tools": {"get_forecast": "5"}, "resources": {"demo://readme": "1"}, "default": 0}}
    command = [sys.executable, "gateway/ops/demo_stdio.py"]
    config = write_config(
        tmp_path,
        {"demo-stdio": None},
        prices=prices,
        server_options={"demo-stdio": {"command": command, "cwd": str(REPO)}},
    )
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with run_gateway(config) as gw:
        key = await gw.new_user("alice", "100", server="demo-stdio")
        async with sdk_client(gw.url("demo-stdio"), key) as client:
            forecast = await client.call_tool("get_forecast", {"city": "Oslo"})
            counted = await client.call_tool("count", {"n": 3}, progress_callback=on_progress)
            readme = await client.read_resource("demo://readme")
            brief = await client.get_prompt("daily_brief", {"city": "Oslo"})
        assert "Sunny in Oslo" in forecast.content[0].text  # type: ignore[union-attr]
        assert counted.content[0].text == "counted to 3" and seen == [1, 2, 3]  # type: ignore[union-attr]
        assert "stdio" in readme.contents[0].text  # type: ignore[union-attr]
        assert "Oslo" in brief.messages[0].content.text  # type: ignore[union-attr]
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("94")
