"""Everything a running gateway shares between requests, created by ``gateway.app``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from gateway.billing.reload import PriceBook
from gateway.billing.settlement import Billing
from gateway.config import GatewayConfig
from gateway.ledger.interfaces import Ledger
from gateway.logins.service import LoginService
from gateway.metrics import Metrics
from gateway.payments import Payments
from gateway.protocol.sessions import Sessions, SessionSigner
from gateway.proxy.auth import Authenticator
from gateway.proxy.limits import KeyLimits

if TYPE_CHECKING:  # oauth imports the proxy's routing, which imports this module
    from gateway.oauth.service import OAuthService


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
    logins: LoginService  # the portal's sign-up, sign-in and sessions (opened and closed with the app)
    payments: Payments | None = None  # Stripe top-ups and payouts (issue 16); None: not configured
    hosts: dict[str, str] = field(default_factory=dict)  # lower-case Host -> server name
    oauth: OAuthService | None = None  # the OAuth authorization server (``oauth.enabled``)
    draining: bool = False


RUNTIME: web.AppKey[Runtime] = web.AppKey("runtime", Runtime)
