"""Test harness: a real gateway (aiohttp test server on an ephemeral loopback port) on a real SQLite
file, configured through real YAML files, plus an official-SDK MCP client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.api.admin import create_admin_app
from gateway.api.operations import Operations
from gateway.app import create_app, server_options
from gateway.config import load_config
from gateway.http_server import GatewayRunner
from gateway.ledger import open_ledger
from gateway.ledger.base import AccountKind
from gateway.ledger.interfaces import Ledger
from gateway.runtime import RUNTIME, Runtime

DEFAULT_PRICES: dict[str, Any] = {
    "weather": {
        "tools": {"get_forecast": "5", "premium_*": "25", "wait_for_release": "5", "boom": "5"},
        "resources": {"weather://alerts/*": "1", "demo://alerts/*": "1"},
        "prompts": {"daily_brief": "2"},
        "default": 0,
    }
}
FAULT_PRICES: dict[str, Any] = {
    "weather": {"tools": {"*": "5", "echo": 0}, "resources": {"*": "1"}, "prompts": {"*": "2"}, "default": 0}
}


def write_config(
    tmp: Path,
    upstreams: dict[str, str | None],
    prices: dict[str, Any] | None = None,
    **top: Any,
) -> Path:
    servers: dict[str, Any] = {}
    for name, url in upstreams.items():
        entry: dict[str, Any] = {"owner": "acme"}
        if url is not None:
            entry["upstream"] = url
        servers[name] = entry
    for name, extra in top.pop("server_options", {}).items():
        servers[name].update(extra)
    config = {"listen": "127.0.0.1:8080", "database": "sqlite:///ledger.db", "prices": "prices.yaml", **top}
    config["servers"] = servers
    (tmp / "prices.yaml").write_text(yaml.safe_dump(prices if prices is not None else DEFAULT_PRICES))
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class GatewayTestServer(TestServer):
    """aiohttp's test server, serving through the gateway's own HTTP server (``GatewayRunner``):
    fixed parser-error bodies and the request-header deadline, as ``agentpay serve`` has them."""

    def __init__(self, app: web.Application, *, header_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, header_timeout_s=self.header_timeout_s, **kwargs)


@dataclass
class Gateway:
    config_path: Path
    server: TestServer

    @property
    def rt(self) -> Runtime:
        return self.server.app[RUNTIME]

    @property
    def ledger(self) -> Ledger:
        return self.rt.ledger

    @property
    def ops(self) -> Operations:
        return Operations(self.ledger, self.rt.config)

    def url(self, server: str = "weather", path_key: str | None = None) -> str:
        base = str(self.server.make_url("/")).rstrip("/")
        prefix = f"/k/{path_key}" if path_key else ""
        return f"{base}{prefix}/{server}/mcp"

    async def new_user(self, name: str, cents: str, server: str = "weather", **key_opts: Any) -> str:
        return await new_user(self.ops, name, cents, server, **key_opts)

    async def balance(self, user: str) -> int:
        return (await self.ledger.get_account(AccountKind.USER, user)).balance

    async def held(self, user: str) -> int:
        return (await self.ledger.get_account(AccountKind.USER, user)).held

    async def earnings(self, developer: str = "acme") -> int:
        return (await self.ledger.get_account(AccountKind.DEVELOPER, developer)).balance

    async def settled(self) -> None:
        async with asyncio.timeout(10):
            await self.rt.billing.wait_settled()

    async def settled_except(self, held: int) -> None:
        """Wait until only ``held`` calls remain in flight (the rest captured or voided)."""
        async with asyncio.timeout(10):
            while self.rt.billing.inflight > held or self.rt.billing.settling:
                await self.rt.billing.wait_progress()

    async def verify_clean(self) -> None:
        await self.settled()
        assert await self.ledger.verify() == []


async def new_user(ops: Operations, name: str, cents: str, server: str = "weather", **key_opts: Any) -> str:
    """A user with ``cents`` on their balance and an API key for ``server``: the key's secret."""
    await ops.create_user(name, cents)
    key = await ops.create_key(user=name, server=server, **key_opts)
    return str(key["key"])


async def prepare_ledger(config_path: Path, developers: tuple[str, ...] = ("acme", "rival")) -> None:
    config = load_config(config_path)
    ledger = open_ledger(config.database)
    await ledger.open()
    try:
        for dev in developers:
            await ledger.create_developer(dev)
    finally:
        await ledger.close()


@asynccontextmanager
async def prepared_ledger(config_path: Path) -> AsyncIterator[Ledger]:
    """The configured ledger with its developers made (``prepare_ledger``), open; closed after."""
    await prepare_ledger(config_path)
    ledger = open_ledger(load_config(config_path).database)
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.close()


@asynccontextmanager
async def run_gateway(config_path: Path) -> AsyncIterator[Gateway]:
    await prepare_ledger(config_path)
    config = load_config(config_path)
    app: web.Application = create_app(config)
    server = GatewayTestServer(app, header_timeout_s=config.client_header_timeout_s, host="127.0.0.1", port=None)
    options = server_options(config)
    del options["handler_cancellation"]  # TestServer always sets it
    await server.start_server(**options)
    try:
        yield Gateway(config_path, server)
    finally:
        await server.close()


@asynccontextmanager
async def run_admin(gw: Gateway, token: str | None) -> AsyncIterator[TestServer]:
    """The admin listener of a running test gateway, built as ``agentpay serve`` builds it (the admin
    app on ``GatewayRunner``), on an ephemeral loopback port. ``token``: the admin token (None: off)."""
    app = create_admin_app(lambda: gw.ops, token)
    app[RUNTIME] = gw.rt
    server = GatewayTestServer(app, header_timeout_s=gw.rt.config.client_header_timeout_s, host="127.0.0.1", port=None)
    await server.start_server(access_log=None)
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def mcp_client(
    url: str, key: str | None, *, mode: str = "auto", header: str = "Authorization"
) -> AsyncIterator[Client]:
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key
    http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0))
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode) as client:
        yield client


def rpc(method: str, params: dict[str, Any] | None = None, rid: int | str | None = 1) -> dict[str, Any]:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    if rid is not None:
        body["id"] = rid
    return body


def tool_call(name: str, arguments: dict[str, Any] | None = None, rid: int | str = 1) -> dict[str, Any]:
    return rpc("tools/call", {"name": name, "arguments": arguments or {}}, rid)


def dumps(value: Any) -> str:
    return json.dumps(value)


def agentpay_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m gateway --config CONFIG ARGS…`` as its own process, from the repository's root."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
