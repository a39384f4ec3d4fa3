"""Running the gateway process: pre-flight checks, the gateway and admin listeners, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web

from gateway import logs
from gateway.api.admin import create_admin_app
from gateway.api.operations import Operations
from gateway.app import check_owners, create_app, server_options
from gateway.billing.pricing import load_prices
from gateway.config import GatewayConfig, parse_listen
from gateway.errors import ConfigError
from gateway.http_server import GatewayRunner
from gateway.ledger import open_ledger
from gateway.money import format_cents
from gateway.runtime import RUNTIME
from gateway.stdio.process import command_problem

log = structlog.get_logger("gateway")


async def check(config: GatewayConfig) -> dict[str, Any]:
    """Validate the config, the price table and that every owner exists (creating the schema)."""
    table = load_prices(config.prices_path, config.servers.keys())
    ledger = open_ledger(config.database)
    await ledger.open()
    try:
        await check_owners(config, ledger)
    finally:
        await ledger.close()
    for name, srv in config.servers.items():
        problem = command_problem(srv.stdio) if srv.stdio is not None else None
        if problem is not None:
            raise ConfigError(f"servers.{name}.command cannot start: {problem}", file=str(config.path))
    return {
        "config": str(config.path),
        "prices": str(config.prices_path),
        "prices_digest": table.digest,
        "servers": {
            name: {
                "upstream": srv.upstream,
                "command": list(srv.stdio.command) if srv.stdio is not None else None,  # a stdio server
                "owner": srv.owner,
                "hosts": list(srv.hosts),
                "default_price_cents": format_cents(table.default(name)),
            }
            for name, srv in config.servers.items()
        },
        "ok": True,
    }


def _ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load tls_cert/tls_key: {exc}", file=str(config.path)) from None
    return context


async def run(
    config: GatewayConfig,
    *,
    on_ready: Callable[[], Awaitable[None]] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain: stop accepting, let in-flight calls finish and settle
    (bounded by ``drain_grace_s``), close."""
    ssl_context = _ssl_context(config)
    app = create_app(config)
    runner = GatewayRunner(
        app,
        header_timeout_s=config.client_header_timeout_s,
        shutdown_timeout=config.drain_grace_s,
        **server_options(config),
    )
    await runner.setup()
    runners = [runner]
    try:
        await web.TCPSite(
            runner, config.listen_host, config.listen_port, ssl_context=ssl_context, reuse_port=reuse_port or None
        ).start()
        if config.admin_listen is not None:
            rt = app[RUNTIME]
            admin = create_admin_app(lambda: Operations(rt.ledger, rt.config), config.admin_token)
            admin[RUNTIME] = rt
            admin_runner = GatewayRunner(
                admin, header_timeout_s=config.client_header_timeout_s, access_log=None, shutdown_timeout=5
            )
            await admin_runner.setup()
            runners.insert(0, admin_runner)
            host, port = parse_listen(config.admin_listen)
            await web.TCPSite(admin_runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        log.info("gateway_ready", listen=config.listen, admin=config.admin_listen, servers=sorted(config.servers))
        if on_ready is not None:
            await on_ready()
        await stop.wait()
        log.info("gateway_draining", grace_s=config.drain_grace_s)
    finally:
        for each in runners:
            await each.cleanup()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (measurably faster for a proxy), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def serve(config: GatewayConfig, *, reuse_port: bool = False) -> int:
    """Serve in this process; ``reuse_port`` when it is one of ``serve --workers N``'s workers."""
    logs.configure(config.log_format)
    asyncio.run(check(config))
    try:
        _run_loop(run(config, reuse_port=reuse_port))
    except OSError as exc:
        raise ConfigError(f"cannot listen: {exc}", file=str(config.path)) from None
    return 0
