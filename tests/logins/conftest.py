"""Fixtures for the logins tests: every test that takes ``logins`` runs once per store — a real
SQLite file, and a fresh schema in a real PostgreSQL (``tests.ledger.conftest``) — with a ledger,
the login service on the same database, and a clock the test controls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from gateway.config import PortalConfig
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger
from gateway.logins import LoginService, Mailer, Passwords, open_login_store
from tests.ledger.conftest import STORES, FakeClock, StoreSpec

BASE_URL = "http://portal.test:8080"


def database_url(spec: StoreSpec) -> str:
    if spec.kind == "sqlite":
        return f"sqlite:///{spec.location}"
    return f"{spec.location}?schema={spec.schema}"


def cheap_passwords() -> Passwords:
    """Real argon2id with small costs, so that a test hashes in milliseconds (one test checks the defaults)."""
    return Passwords(PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


@dataclass
class LoginsEnv:
    spec: StoreSpec
    ledger: SqliteLedger | PostgresLedger
    clock: FakeClock
    make: Callable[..., LoginService]
    service: LoginService


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreSpec]:
    spec = StoreSpec.fresh(request.param, tmp_path)
    try:
        yield spec
    finally:
        await spec.drop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def env(store: StoreSpec, clock: FakeClock) -> AsyncIterator[LoginsEnv]:
    """An open ledger and an open login service (sign-up open, no SMTP) on each store."""
    ledger = store.open(clock)
    await ledger.open()
    opened: list[LoginService] = []

    def make(
        *,
        signup: str = "open",
        mailer: Mailer | None = None,
        session_ttl_s: float = 3600.0,
        passwords: Passwords | None = None,
    ) -> LoginService:
        config = PortalConfig(signup=signup, base_url=BASE_URL, session_ttl_s=session_ttl_s)  # type: ignore[arg-type]
        service = LoginService(
            open_login_store(database_url(store), clock=clock),
            ledger,
            config=config,
            mailer=mailer,
            clock=clock,
            passwords=passwords or cheap_passwords(),
        )
        opened.append(service)
        return service

    service = make()
    await service.open()
    try:
        yield LoginsEnv(store, ledger, clock, make, service)
    finally:
        for each in opened:
            await each.close()
        await ledger.close()
