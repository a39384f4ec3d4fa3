"""The ``payments:`` section (the issue's contract: exact keys, ${VAR} secrets, line-numbered errors)
and the webhook endpoint's limits."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from gateway.config import parse_config
from gateway.errors import ConfigError
from tests.payments.conftest import pay_gateway
from tests.payments.fake_stripe import FakeStripe

BASE = """\
database: sqlite:///ledger.db
prices: prices.yaml
servers: {}
"""
SECTION = """\
payments:
  stripe:
    secret_key: "${STRIPE_SECRET_KEY}"
    webhook_secret: "${STRIPE_WEBHOOK_SECRET}"
    api_base: null
    currency: usd
    min_topup_cents: 500
    max_topup_cents: 100000
"""
ENV = {"STRIPE_SECRET_KEY": "sk_test_secret_value", "STRIPE_WEBHOOK_SECRET": "whsec_secret_value"}


def parse(text: str, env: dict[str, str] | None = None) -> object:
    return parse_config(BASE + text, path=Path("/tmp/gateway.yaml"), env=ENV if env is None else env)


def test_the_stripe_secrets_come_from_the_environment_and_stay_out_of_repr() -> None:
    config = parse(SECTION)
    stripe = config.payments.stripe  # type: ignore[attr-defined]
    assert stripe.secret_key == "sk_test_secret_value" and stripe.webhook_secret == "whsec_secret_value"
    assert (stripe.api_base, stripe.currency, stripe.min_topup_cents, stripe.max_topup_cents) == (
        None,
        "usd",
        500,
        100000,
    )
    assert "secret_value" not in repr(config)


@pytest.mark.parametrize(
    ("change", "line", "message"),
    [
        (("currency: usd", "currency: jpy"), 9, "has no cents"),
        (("currency: usd", "currency: dollars"), 9, "three-letter ISO code"),
        (("max_topup_cents: 100000", "max_topup_cents: 100"), 11, "must be at least min_topup_cents"),
        (("api_base: null", "api_base: ftp://x"), 8, "http://"),
        (("    currency: usd", "    curency: usd"), 9, "did you mean 'currency'"),
    ],
)
def test_a_wrong_stripe_setting_is_refused_with_its_line(change: tuple[str, str], line: int, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(SECTION.replace(*change))
    assert refused.value.line == line and message in refused.value.message


def test_a_missing_secret_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="STRIPE_WEBHOOK_SECRET is not set"):
        parse(SECTION, env={"STRIPE_SECRET_KEY": "sk_test_x"})


def test_without_a_payments_section_card_payments_are_off() -> None:
    assert parse("").payments.stripe is None  # type: ignore[attr-defined]


async def test_an_oversized_webhook_body_is_refused_before_it_is_checked(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg, aiohttp.ClientSession() as http:
        async with http.post(pg.webhook, data=b"x" * (512 * 1024 + 1), headers={"Stripe-Signature": "t=1,v1=00"}) as r:
            assert r.status == 413
            assert (await r.json())["error"]["code"] == "body_too_large"
        async with http.get(pg.webhook) as r:
            assert r.status == 405


async def test_a_large_signed_event_is_read_whole_before_its_signature_is_checked(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        event = fake_stripe.record("customer.updated", {"id": "cus_x", "metadata": {"pad": "x" * 300_000}})
        status, body = await pg.deliver(event)
        assert (status, body["outcome"]) == (200, "ignored")
