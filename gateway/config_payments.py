"""The ``payments:`` section of the gateway configuration (issue 16): Stripe top-ups and payouts.

```yaml
payments:
  stripe:
    secret_key: "${STRIPE_SECRET_KEY}"
    webhook_secret: "${STRIPE_WEBHOOK_SECRET}"
    api_base: null            # default Stripe; tests point it at a local fake (http://127.0.0.1:PORT)
    currency: usd
    min_topup_cents: 500
    max_topup_cents: 100000
  payout_schedule:            # optional: pay every developer's earnings automatically
    interval_s: 86400
    minimum_cents: 1000
```
Parsed with the same ``Reader`` as the rest of ``gateway.config`` (every error with its file and line);
the secrets are ``${VAR}``-expanded and kept out of ``repr()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from yaml.nodes import Node

from gateway.config_yaml import Reader, is_null, line_of

_PAYMENTS_KEYS = ("stripe", "payout_schedule")
_STRIPE_KEYS = ("secret_key", "webhook_secret", "api_base", "currency", "min_topup_cents", "max_topup_cents")
_SCHEDULE_KEYS = ("interval_s", "minimum_cents")
_CURRENCY_RE = re.compile(r"^[a-z]{3}$")
# Stripe amounts are in the currency's minor unit; the ledger counts cents (1/100 of the unit). A
# currency without cents (or with three decimals) would be credited 100x wrong: refused.
ZERO_OR_THREE_DECIMAL_CURRENCIES = frozenset(
    {
        "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf",
        "xof", "xpf", "bhd", "jod", "kwd", "omr", "tnd",
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class StripeConfig:
    secret_key: str = field(repr=False)  # a secret: kept out of repr()
    webhook_secret: str = field(repr=False)
    api_base: str | None = None  # None: Stripe itself
    currency: str = "usd"
    min_topup_cents: int = 500
    max_topup_cents: int = 100000


@dataclass(frozen=True, slots=True, kw_only=True)
class PayoutSchedule:
    interval_s: float = 86400.0
    minimum_cents: int = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentsConfig:
    stripe: StripeConfig | None = None  # None: no card payments (the manual rail only)
    payout_schedule: PayoutSchedule | None = None


def parse_payments(r: Reader, node: Node) -> PaymentsConfig:
    entries = r.mapping(node, "payments")
    r.check_keys(entries, _PAYMENTS_KEYS, "payments")
    stripe = None
    if "stripe" in entries and not is_null(entries["stripe"][1]):
        stripe = _stripe(r, entries["stripe"][1])
    schedule = None
    if "payout_schedule" in entries and not is_null(entries["payout_schedule"][1]):
        schedule = _schedule(r, entries["payout_schedule"][1])
        if stripe is None:
            raise r.error("payments.payout_schedule needs payments.stripe (payouts are Stripe transfers)", node)
    return PaymentsConfig(stripe=stripe, payout_schedule=schedule)


def _stripe(r: Reader, node: Node) -> StripeConfig:
    entries = r.mapping(node, "payments.stripe")
    r.check_keys(entries, _STRIPE_KEYS, "payments.stripe")
    line = line_of(node)

    def opt_int(key: str, default: int) -> int:
        if key not in entries or is_null(entries[key][1]):
            return default
        return r.integer(entries[key][1], f"payments.stripe.{key}", minimum=1)

    secret_key = r.env_string(r.require(entries, "secret_key", "payments.stripe", line), "payments.stripe.secret_key")
    webhook_node = r.require(entries, "webhook_secret", "payments.stripe", line)
    webhook_secret = r.env_string(webhook_node, "payments.stripe.webhook_secret")
    if not webhook_secret.startswith("whsec_"):
        raise r.error(
            "payments.stripe.webhook_secret must be the endpoint's signing secret (it starts with whsec_)", webhook_node
        )
    api_base = None
    if "api_base" in entries and not is_null(entries["api_base"][1]):
        api_base = r.http_url(entries["api_base"][1], "payments.stripe.api_base").rstrip("/")
    currency = "usd"
    if "currency" in entries and not is_null(entries["currency"][1]):
        currency_node = entries["currency"][1]
        currency = r.string(currency_node, "payments.stripe.currency").strip().lower()
        if not _CURRENCY_RE.match(currency):
            raise r.error(f"payments.stripe.currency must be a three-letter ISO code such as usd, got {currency!r}",
                          currency_node)  # fmt: skip
        if currency in ZERO_OR_THREE_DECIMAL_CURRENCIES:
            raise r.error(
                f"payments.stripe.currency {currency!r} has no cents (or three decimals); AgentPay balances are kept "
                "in cents: use a two-decimal currency such as usd or eur",
                currency_node,
            )
    minimum = opt_int("min_topup_cents", 500)
    maximum = opt_int("max_topup_cents", 100000)
    if maximum < minimum:
        where = entries["max_topup_cents"][1] if "max_topup_cents" in entries else line
        raise r.error(
            f"payments.stripe.max_topup_cents ({maximum}) must be at least min_topup_cents ({minimum})", where
        )
    return StripeConfig(
        secret_key=secret_key,
        webhook_secret=webhook_secret,
        api_base=api_base,
        currency=currency,
        min_topup_cents=minimum,
        max_topup_cents=maximum,
    )


def _schedule(r: Reader, node: Node) -> PayoutSchedule:
    entries = r.mapping(node, "payments.payout_schedule")
    r.check_keys(entries, _SCHEDULE_KEYS, "payments.payout_schedule")
    interval = 86400.0
    if "interval_s" in entries and not is_null(entries["interval_s"][1]):
        interval = r.number(entries["interval_s"][1], "payments.payout_schedule.interval_s", positive=True)
    minimum = 1000
    if "minimum_cents" in entries and not is_null(entries["minimum_cents"][1]):
        minimum = r.integer(entries["minimum_cents"][1], "payments.payout_schedule.minimum_cents", minimum=1)
    return PayoutSchedule(interval_s=interval, minimum_cents=minimum)
