"""Fixtures for the ledger tests: every test that takes ``ledger`` (or ``store``) runs once per
store — a real SQLite file, and a fresh schema in a real PostgreSQL — with a clock the test controls.

PostgreSQL is database ``test`` on 127.0.0.1:5432 as user ``postgres`` (falling back to ``root``);
``AGENTPAY_TEST_POSTGRES_DSN`` overrides it. The PostgreSQL tests never skip: when the server is
unreachable they fail with the command that starts it.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from gateway.ledger.base import HoldRequest
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger

T = TypeVar("T")
STORES = ("sqlite", "postgres")
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
PG_CANDIDATES = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
)


class PostgresUnreachable(RuntimeError):
    pass


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion on a private loop (callable with or without a running loop)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _probe(dsn: str) -> None:
    conn = await asyncpg.connect(dsn, timeout=5)
    await conn.close()


@functools.cache
def _reachable_dsn() -> str:
    override = os.environ.get("AGENTPAY_TEST_POSTGRES_DSN")
    errors = []
    for dsn in (override,) if override else PG_CANDIDATES:
        try:
            run_sync(_probe(dsn))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            errors.append(f"{dsn}: {type(exc).__name__}: {exc}")
        else:
            return dsn
    raise PostgresUnreachable(
        "PostgreSQL is not reachable for the ledger tests (" + "; ".join(errors) + "). "
        f"Start it with: {PG_START}  (or set AGENTPAY_TEST_POSTGRES_DSN)"
    )


def postgres_dsn() -> str:
    """The DSN of the test database; fails the test (never skips) when it is unreachable."""
    try:
        return _reachable_dsn()
    except PostgresUnreachable as exc:
        message = str(exc)
    pytest.fail(message, pytrace=False)


@dataclass(frozen=True)
class StoreSpec:
    """Where one test's ledger lives; picklable, so child processes can open the same store."""

    kind: str  # "sqlite" | "postgres"
    location: str  # the SQLite file, or the PostgreSQL DSN
    schema: str | None = None  # PostgreSQL: the test's own schema

    @classmethod
    def fresh(cls, kind: str, directory: Path, name: str = "ledger") -> StoreSpec:
        if kind == "sqlite":
            return cls("sqlite", str(directory / f"{name}.db"))
        if kind == "postgres":
            return cls("postgres", postgres_dsn(), "t_" + uuid.uuid4().hex)
        raise ValueError(f"unknown store {kind!r}")

    def open(self, clock: Callable[[], float] = time.time) -> SqliteLedger | PostgresLedger:
        """A ledger on this store, not yet opened."""
        if self.kind == "sqlite":
            return SqliteLedger(self.location, clock=clock)
        return PostgresLedger(self.location, clock=clock, schema=self.schema, max_size=5)

    # Raw SQL for tests that inspect or tamper with the tables; '?' placeholders on both stores.
    async def fetchval(self, sql: str, *params: object) -> Any:
        if self.kind == "sqlite":
            with sqlite3.connect(self.location) as conn:
                row = conn.execute(sql, params).fetchone()
                return None if row is None else row[0]
        conn = await self.pg_connect()
        try:
            return await conn.fetchval(_numbered(sql), *params)
        finally:
            await conn.close()

    async def execute(self, sql: str, *params: object) -> None:
        if self.kind == "sqlite":
            with sqlite3.connect(self.location) as conn:
                conn.execute(sql, params)
            return
        conn = await self.pg_connect()
        try:
            await conn.execute(_numbered(sql), *params)
        finally:
            await conn.close()

    async def drop(self) -> None:
        """Remove a PostgreSQL test schema (a SQLite file goes with the test's tmp_path)."""
        if self.kind == "postgres" and self.schema is not None:
            conn = await asyncpg.connect(self.location)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            finally:
                await conn.close()

    async def pg_connect(self) -> asyncpg.Connection:
        """A raw connection to this test's PostgreSQL schema (closed by the caller)."""
        return await asyncpg.connect(self.location, server_settings={"search_path": f'"{self.schema}"'})


def _numbered(sql: str) -> str:
    """'?' placeholders as PostgreSQL's $1, $2, …"""
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


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


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreSpec]:
    """A fresh, empty store of each kind: a SQLite file, or a new PostgreSQL schema (dropped after)."""
    spec = StoreSpec.fresh(request.param, tmp_path)
    try:
        yield spec
    finally:
        await spec.drop()


async def blocked_behind(conn: asyncpg.Connection) -> int:
    """The pid of the backend waiting for a lock that ``conn`` holds (asking the server until one is)."""
    blocker = conn.get_server_pid()
    async with asyncio.timeout(10):
        while True:
            pid = await conn.fetchval("SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", blocker)
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.01)


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[StoreSpec]:
    """A fresh PostgreSQL schema only (for tests of PostgreSQL-specific behaviour), dropped after."""
    spec = StoreSpec.fresh("postgres", tmp_path)
    try:
        yield spec
    finally:
        await spec.drop()


@pytest.fixture
async def ledger(store: StoreSpec, clock: FakeClock) -> AsyncIterator[SqliteLedger | PostgresLedger]:
    """An open ledger with user 'alice' and developer 'acme' (no money yet), on each store."""
    opened = store.open(clock)
    await opened.open()
    try:
        await opened.create_user("alice")
        await opened.create_developer("acme")
        yield opened
    finally:
        await opened.close()


HoldFactory = Callable[..., HoldRequest]


@pytest.fixture
async def sqlite_ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    """An open SQLite ledger (real clock) with alice (1,000 cents) and the developer acme."""
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        await ledger.create_user("alice")
        await ledger.create_developer("acme")
        await ledger.topup("alice", 1_000)
        yield ledger
    finally:
        await ledger.close()


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


@contextmanager
def thread_paused(executor: Executor | None) -> Iterator[None]:
    """Keep a ledger's single-thread executor (SQLite's writer or syncer) busy inside the block:
    everything submitted meanwhile waits and then runs together."""
    assert executor is not None, "the ledger is not open"
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    executor.submit(block)
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()
