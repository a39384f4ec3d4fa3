"""Fixtures for the ledger tests: a real SQLite file per test and a clock the test controls."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.ledger.base import HoldRequest
from gateway.ledger.sqlite import SqliteLedger


class FakeClock:
    """Injectable time: tests move it forward instead of sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "ledger.db"


@pytest.fixture
async def ledger(db_path: Path, clock: FakeClock) -> AsyncIterator[SqliteLedger]:
    """An open ledger with user 'alice' and developer 'acme' (no money yet)."""
    store = SqliteLedger(db_path, clock=clock)
    await store.open()
    await store.create_user("alice")
    await store.create_developer("acme")
    try:
        yield store
    finally:
        await store.close()


HoldFactory = Callable[..., HoldRequest]


@pytest.fixture
def hold_req() -> HoldFactory:
    """Build a HoldRequest: ``hold_req("call-1", amount=500, fee=50, key_id=...)``."""

    def make(
        call_id: str,
        *,
        amount: int,
        fee: int = 0,
        user: str = "alice",
        developer: str = "acme",
        key_id: str | None = None,
        lease_s: float = 30.0,
        server: str = "weather",
        method: str = "tools/call",
        name: str = "forecast",
    ) -> HoldRequest:
        return HoldRequest(
            call_id=call_id,
            key_id=key_id,
            user=user,
            developer=developer,
            server=server,
            method=method,
            name=name,
            amount=amount,
            fee=fee,
            lease_s=lease_s,
            owner="test-process",
        )

    return make
