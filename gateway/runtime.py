"""Everything a running gateway shares between requests, created by ``gateway.app``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import Authenticator
from gateway.billing import Billing
from gateway.config import GatewayConfig
from gateway.ledger.interfaces import Ledger
from gateway.limits import KeyLimits
from gateway.metrics import Metrics
from gateway.reload import PriceBook
from gateway.sessions import Sessions, SessionSigner


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
