"""Everything a running gateway shares between requests, created by ``gateway.app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.billing.reload import PriceBook
from gateway.billing.settlement import Billing
from gateway.config import GatewayConfig
from gateway.ledger.interfaces import Ledger
from gateway.metrics import Metrics
from gateway.protocol.sessions import Sessions, SessionSigner
from gateway.proxy.auth import Authenticator
from gateway.proxy.limits import KeyLimits


@dataclass(slots=True)
class Runtime:
    config: GatewayConfig
    ledger: Ledger
    prices: PriceBook
    billing: Billing
    auth: Authenticator
    metrics: Metrics
    sessions: Sessions
    signer: SessionSigner
    limits: KeyLimits
    hosts: dict[str, str] = field(default_factory=dict)  # lower-case Host -> server name
    draining: bool = False


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
