"""Fixtures for the payment tests: a fake Stripe on loopback (``fake_stripe``) and a real gateway whose
``payments.stripe.api_base`` points at it, on a real SQLite file (or PostgreSQL where the store
matters), driven by the real ``stripe`` library."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.ledger.base import AccountKind
from gateway.money import MILLIS_PER_CENT
from gateway.payments import Payments
from tests.harness import Gateway, run_gateway, write_config
from tests.ledger.conftest import postgres_dsn
from tests.payments.fake_stripe import SECRET_KEY, WEBHOOK_SECRET, FakeStripe

NO_UPSTREAM = "http://127.0.0.1:9/mcp"  # never called: these gateways serve no priced call


@pytest.fixture
async def fake_stripe() -> AsyncIterator[FakeStripe]:
    fake = FakeStripe()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


def stripe_section(fake: FakeStripe, **extra: Any) -> dict[str, Any]:
    return {
        "stripe": {
            "secret_key": SECRET_KEY,
            "webhook_secret": WEBHOOK_SECRET,
            "api_base": fake.url,
            "currency": "usd",
            "min_topup_cents": 500,
            "max_topup_cents": 100000,
            **extra,
        }
    }


@dataclass
class PayGateway:
    gw: Gateway
    fake: FakeStripe

    @property
    def payments(self) -> Payments:
        assert self.gw.rt.payments is not None
        return self.gw.rt.payments

    @property
    def webhook(self) -> str:
        return str(self.gw.server.make_url("/payments/stripe/webhook"))

    async def deliver(self, event: dict[str, Any], **kwargs: Any) -> tuple[int, dict[str, Any]]:
        return await self.fake.deliver(self.webhook, event, **kwargs)

    async def available_cents(self, user: str) -> float:
        return (await self.gw.ledger.get_account(AccountKind.USER, user)).available / MILLIS_PER_CENT

    async def user(self, name: str) -> None:
        await self.gw.ops.create_user(name, None)

    async def paid_topup(self, user: str, cents: int, **pay: Any) -> tuple[str, dict[str, Any]]:
        """A top-up link paid at Stripe: (top-up id, the completion event, not yet delivered)."""
        link = await self.payments.create_topup_link(user, cents)
        return link.topup_id, self.fake.pay_session(link.session_id, **pay)

    async def verify_clean(self) -> None:
        await self.gw.verify_clean()


@asynccontextmanager
async def pay_gateway(
    tmp_path: Path, fake: FakeStripe, *, upstream: str = NO_UPSTREAM, database: str | None = None, **top: Any
) -> AsyncIterator[PayGateway]:
    options: dict[str, Any] = {"payments": top.pop("payments", None) or stripe_section(fake), **top}
    if database is not None:
        options["database"] = database
    async with run_gateway(write_config(tmp_path, {"weather": upstream}, **options)) as gw:
        yield PayGateway(gw, fake)


StoreUrl = Callable[[Path], str]


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The gateway's database URL on each store (PostgreSQL: a fresh schema, dropped after)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    dsn = postgres_dsn()
    schema = "t_" + uuid.uuid4().hex
    try:
        yield f"{dsn}?schema={schema}"
    finally:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Wait until ``check()`` (awaited if a coroutine) is truthy."""
    async with asyncio.timeout(timeout_s):
        while True:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.01)
