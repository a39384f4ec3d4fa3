"""npm ``@modelcontextprotocol/server-everything`` in stdio mode, run by the gateway and used through
it with the official SDK client: tools, progress, resources, prompts, sampling and elicitation, with
priced calls charged once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mcp.types as types
import pytest
from mcp.client.context import ClientRequestContext

from gateway.money import parse_cents
from tests.clients.npm import NpmUnavailable, ensure_installed
from tests.harness import run_gateway, write_config
from tests.stdio.conftest import sdk_client

PRICES: dict[str, Any] = {
    "everything": {
        "tools": {"get-sum": "3", "trigger-long-running-operation": "1", "trigger-sampling-request": "2"},
        "resources": {"demo://resource/static/*": "1"},
        "prompts": {"simple-prompt": "1"},
        "default": 0,
    }
}


@pytest.fixture(scope="module")
def everything_command() -> list[str]:
    try:
        tools = ensure_installed()
    except NpmUnavailable as exc:
        pytest.fail(f"npm could not provide server-everything: {exc}")
    return [str(tools.node), str(tools.everything_server), "stdio"]


@pytest.mark.timeout(120)
async def test_server_everything_over_stdio_round_trips_every_feature_and_bills_once(
    tmp_path: Path, everything_command: list[str]
) -> None:
    config = write_config(
        tmp_path,
        {"everything": None},
        prices=PRICES,
        server_options={"everything": {"command": everything_command, "warm_processes": 0}},
    )
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="sampled!"), model="test-model"
        )

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        return types.ElicitResult(action="decline")

    async with run_gateway(config) as gw:
        key = await gw.new_user("alice", "100", server="everything")
        async with sdk_client(
            gw.url("everything"), key, sampling_callback=sampling, elicitation_callback=elicitation
        ) as client:
            names = {tool.name for tool in (await client.list_tools()).tools}
            summed = await client.call_tool("get-sum", {"a": 2, "b": 3})
            echoed = await client.call_tool("echo", {"message": "hi"})
            long_run = await client.call_tool(
                "trigger-long-running-operation", {"duration": 0.3, "steps": 3}, progress_callback=on_progress
            )
            read = await client.read_resource("demo://resource/static/document/architecture.md")
            prompt = await client.get_prompt("simple-prompt", {})
            sampled = await client.call_tool("trigger-sampling-request", {"prompt": "hello", "maxTokens": 10})
            elicited = await client.call_tool("trigger-elicitation-request", {})
        assert "5" in summed.content[0].text  # type: ignore[union-attr]
        assert "hi" in echoed.content[0].text  # type: ignore[union-attr]
        assert not long_run.is_error and seen == [1, 2, 3]
        assert read.contents
        assert prompt.messages
        assert "sampled!" in str(sampled.content)
        assert not elicited.is_error and "decline" in str(elicited.content)
        assert {"trigger-sampling-request", "trigger-elicitation-request"} <= names
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("92")  # 3 + 1 + 1 + 1 + 2
