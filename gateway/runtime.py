"""Everything a running gateway shares between requests, created by ``gateway.app``."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from gateway.auth import Authenticator
from gateway.billing import Billing
from gateway.config import GatewayConfig
from gateway.ledger.base import Ledger
from gateway.metrics import Metrics
from gateway.reload import PriceBook


@dataclass(slots=True)
class Runtime:
    config: GatewayConfig
    ledger: Ledger
    prices: PriceBook
    billing: Billing
    auth: Authenticator
    metrics: Metrics
    upstreams: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    # Mcp-Session-Id -> id of the key that opened it. Sessions are not authentication: a request
    # presenting a session opened with another key is answered as an unknown session (404).
    sessions: dict[str, str] = field(default_factory=dict)
    draining: bool = False


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
