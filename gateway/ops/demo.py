"""`agentpay demo`: the gateway in front of the built-in demo MCP server, with a user and a key ready."""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import web

from gateway import logs
from gateway.api.operations import Operations
from gateway.config import GatewayConfig
from gateway.errors import AlreadyExists, ConfigError
from gateway.ledger import open_ledger
from gateway.ops.demo_upstream import DemoUpstream
from gateway.ops.serve import run

DEMO_USER = "demo-user"


async def _prepare(config: GatewayConfig, server: str) -> dict[str, str]:
    ledger = open_ledger(config.database)
    await ledger.open()
    try:
        ops = Operations(ledger, config)
        with contextlib.suppress(AlreadyExists):
            await ops.create_developer(config.servers[server].owner)
        with contextlib.suppress(AlreadyExists):
            await ops.create_user(DEMO_USER, "100")
        key = await ops.create_key(user=DEMO_USER, server=server)
        return {"key": key["key"], "prefix": key["prefix"]}
    finally:
        await ledger.close()


def client_configs(url: str, key: str, server: str) -> str:
    cursor = {"mcpServers": {server: {"url": url, "headers": {"Authorization": f"Bearer {key}"}}}}
    desktop = {
        "mcpServers": {
            server: {
                "command": "npx",
                "args": ["mcp-remote", url, "--header", "Authorization:${AUTH_HEADER}"],
                "env": {"AUTH_HEADER": f"Bearer {key}"},
            }
        }
    }
    return "\n".join(
        [
            "Claude Code:",
            f'  claude mcp add --transport http {server} {url} --header "Authorization: Bearer {key}"',
            "Cursor (~/.cursor/mcp.json):",
            "  " + json.dumps(cursor),
            "Claude Desktop (claude_desktop_config.json, via mcp-remote):",
            "  " + json.dumps(desktop),
        ]
    )


def run_demo(config: GatewayConfig, *, upstream_port: int) -> int:
    demo_servers = [s for s in config.servers.values() if s.upstream is not None]
    if not demo_servers:
        raise ConfigError("the demo needs a server with an upstream in the config", file=str(config.path))
    server = demo_servers[0]
    logs.configure(config.log_format)
    creds = asyncio.run(_prepare(config, server.name))
    asyncio.run(_run(config, server.name, creds["key"], upstream_port))
    return 0


async def _run(config: GatewayConfig, server: str, key: str, upstream_port: int) -> None:
    upstream = web.AppRunner(DemoUpstream().app(), access_log=None)
    await upstream.setup()
    try:
        await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()

        async def announce() -> None:
            url = f"http://{config.listen}/{server}/mcp"
            print(f"\nAgentPay demo: gateway on http://{config.listen}, demo MCP server '{server}' behind it.")
            print(f"User {DEMO_USER!r} has a balance; a new API key for '{server}' (shown once):\n\n  {key}\n")
            print(client_configs(url, key, server))
            print(
                f"\nTry: agentpay --config {config.path} users show {DEMO_USER} --json   (Ctrl-C stops)\n", flush=True
            )

        await run(config, on_ready=announce)
    finally:
        await upstream.cleanup()
