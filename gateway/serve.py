"""Running the gateway process: pre-flight checks, then aiohttp's server with graceful drain."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import structlog
from aiohttp import web

from gateway import logs
from gateway.app import check_owners, create_app
from gateway.config import GatewayConfig
from gateway.errors import ConfigError
from gateway.ledger import open_ledger
from gateway.money import format_cents
from gateway.pricing import load_prices

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
    return {
        "config": str(config.path),
        "prices": str(config.prices_path),
        "prices_digest": table.digest,
        "servers": {
            name: {
                "upstream": srv.upstream,
                "owner": srv.owner,
                "hosts": list(srv.hosts),
                "default_price_cents": format_cents(table.default(name)),
            }
            for name, srv in config.servers.items()
        },
        "ok": True,
    }


def serve(config: GatewayConfig) -> int:
    logs.configure(config.log_format)
    asyncio.run(check(config))
    app = create_app(config)
    log.info("gateway_starting", listen=config.listen, servers=sorted(config.servers))
    ssl_context = None
    if config.tls_cert is not None and config.tls_key is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load tls_cert/tls_key: {exc}", file=str(config.path)) from None
    web.run_app(
        app,
        ssl_context=ssl_context,
        host=config.listen_host,
        port=config.listen_port,
        shutdown_timeout=config.drain_grace_s,
        handler_cancellation=True,
        access_log=None,
        print=None,
    )
    return 0
