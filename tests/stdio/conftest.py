"""Shared set-up of the stdio tests: a gateway whose server ``weather`` is a stdio server it runs."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.harness import write_config

REPO = Path(__file__).resolve().parents[2]
FASTMCP = [sys.executable, "-m", "tests.stdio.fastmcp_stdio_server"]
PRICES: dict[str, Any] = {
    "weather": {
        "tools": {"get_forecast": "5", "boom": "5", "crash": "5", "wait_for_file": "5", "ask_*": "2"},
        "resources": {"weather://alerts/*": "1"},
        "prompts": {"daily_brief": "2"},
        "default": 0,
    }
}


def stdio_config(tmp: Path, command: list[str] | None = None, **options: Any) -> Path:
    """A gateway config whose ``weather`` server is run by the gateway from ``command``."""
    server: dict[str, Any] = {"command": command or FASTMCP, "cwd": str(REPO), **options}
    return write_config(tmp, {"weather": None}, prices=PRICES, server_options={"weather": server})


@asynccontextmanager
async def sdk_client(url: str, key: str, *, mode: str = "legacy", **callbacks: Any) -> AsyncIterator[Client]:
    """The official SDK's client over Streamable HTTP, with the callbacks given (sampling, elicitation)."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode, **callbacks) as client:
        yield client


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll state that lives in other processes (children, their exit) until ``condition()`` holds."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
