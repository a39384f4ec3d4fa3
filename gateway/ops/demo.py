"""`agentpay demo`: the gateway in front of the built-in demo MCP server, with a user and a key ready."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from aiohttp import web

from gateway import logs
from gateway.api.operations import Operations
from gateway.app import login_service
from gateway.config import GatewayConfig
from gateway.errors import AlreadyExists, ConfigError
from gateway.ledger import open_ledger
from gateway.ops.demo_upstream import DemoUpstream
from gateway.ops.serve import run
from gateway.portal.client_setup import client_configs

DEMO_USER = "demo-user"
DEMO_EMAIL = "demo@example.com"  # the demo's portal login: demo-user's account and the server owner's earnings


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
        stdio_keys = {}  # the stdio servers the gateway runs itself: a key for each
        for name, stdio_server in config.servers.items():
            if stdio_server.stdio is not None:
                with contextlib.suppress(AlreadyExists):
                    await ops.create_developer(stdio_server.owner)
                stdio_keys[f"stdio:{name}"] = (await ops.create_key(user=DEMO_USER, server=name))["key"]
        logins = login_service(config, ledger)
        await logins.open()
        try:
            link = await logins.invite(DEMO_EMAIL, user=DEMO_USER, developer=config.servers[server].owner)
        finally:
            await logins.close()
        return {"key": key["key"], "prefix": key["prefix"], "link": link.url, **stdio_keys}
    finally:
        await ledger.close()


def run_demo(config: GatewayConfig, *, upstream_port: int) -> int:
    demo_servers = [s for s in config.servers.values() if s.upstream is not None]
    if not demo_servers:
        raise ConfigError("the demo needs a server with an upstream in the config", file=str(config.path))
    server = demo_servers[0]
    logs.configure(config.log_format)
    for host, port in ((config.listen_host, config.listen_port), ("127.0.0.1", upstream_port)):
        _check_port(config, host, port)  # before anything is written: a busy port is one line
    creds = asyncio.run(_prepare(config, server.name))
    try:
        asyncio.run(_run(config, server.name, creds, upstream_port))
    except OSError as exc:  # taken since the check: still one line, as `serve` says it (no traceback)
        raise _cannot_listen(config, exc) from None
    return 0


def _cannot_listen(config: GatewayConfig, exc: OSError, where: str = "") -> ConfigError:
    return ConfigError(
        f"cannot listen{where}: {exc.strerror if where else exc}; stop what uses the port, or change "
        "`listen` in the config (the demo MCP server's port: --upstream-port)",
        file=str(config.path),
    )


def _check_port(config: GatewayConfig, host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise _cannot_listen(config, exc, f" on {host}:{port}") from None


async def _run(config: GatewayConfig, server: str, creds: dict[str, str], upstream_port: int) -> None:
    key = creds["key"]
    upstream = web.AppRunner(DemoUpstream().app(), access_log=None)
    await upstream.setup()
    try:
        await web.TCPSite(upstream, "127.0.0.1", upstream_port).start()

        async def announce() -> None:
            base = (config.portal.base_url or f"http://{config.listen}").rstrip("/")
            print(f"\nAgentPay demo: gateway on http://{config.listen}, demo MCP server '{server}' behind it.")
            print(f"User {DEMO_USER!r} has a balance; a new API key for '{server}' (shown once):\n\n  {key}\n")
            print(client_configs(base, server, key))
            for name, stdio_key in ((n[6:], k) for n, k in creds.items() if n.startswith("stdio:")):
                command = " ".join(config.servers[name].stdio.command)  # type: ignore[union-attr]
                print(f"\nStdio MCP server '{name}' (the gateway runs `{command}`, one process per session):")
                print(f"  {base}/{name}/mcp   API key (shown once): {stdio_key}")
            if config.oauth.enabled:
                print("\nBy URL alone (OAuth: the client opens the portal to sign in and approve), e.g.:")
                print(f"  claude mcp add --transport http {server} {base}/{server}/mcp")
            print(f"\nPortal: {base}/portal/  (sign in as {DEMO_EMAIL}: set its password once at this link)")
            print(f"  {creds['link']}")
            print(
                f"\nTry: agentpay --config {config.path} users show {DEMO_USER} --json   (Ctrl-C stops)\n", flush=True
            )

        await run(config, on_ready=announce)
    finally:
        await upstream.cleanup()
