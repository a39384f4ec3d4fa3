"""`agentpay migrate` applies the ledger's migrations to the configured store, SQLite or a
PostgreSQL schema, prints what it applied, and is a no-op the second time."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from gateway.ledger.postgres.migrations import MIGRATIONS as PG_MIGRATIONS
from gateway.ledger.sqlite.migrations import MIGRATIONS as SQLITE_MIGRATIONS
from gateway.ledger.sqlite.store import _statements
from gateway.ops.moves import CONCERNS
from tests.harness import write_config
from tests.ledger.conftest import StoreSpec, run_sync

REPO = Path(__file__).resolve().parents[2]
NAMES = [name for name, _ in SQLITE_MIGRATIONS]
# the concerns beside the ledger (logins, OAuth, payment records): migrate creates their tables too
CONCERN_NAMES = [name for concern in CONCERNS for name, _ in concern.sqlite_migrations]
EVERY = NAMES + CONCERN_NAMES  # in the order migrate applies them


def migrate(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "migrate", *extra],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_both_stores_have_the_same_migrations() -> None:
    assert [name for name, _ in PG_MIGRATIONS] == NAMES


def test_migrate_on_sqlite_applies_every_migration_once(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    db = tmp_path / "ledger.db"
    assert not db.exists()

    first = migrate(config, "--json")
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["applied"] == EVERY
    assert report["migrations"] == sorted(EVERY)
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"accounts", "transfers", "postings", "holds", "charges", "payouts", "schema_migrations"} <= tables
        assert {"logins", "oauth_grants", "stripe_topups"} <= tables  # the side concerns' too
        assert conn.execute("SELECT COUNT(*) FROM accounts").fetchone()[0] == 3  # the system accounts

    second = migrate(config, "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["applied"] == []
    assert json.loads(second.stdout)["migrations"] == sorted(EVERY)

    human = migrate(config)
    assert human.returncode == 0, human.stderr
    assert "applied" not in human.stdout
    assert "schema up to date" in human.stdout and NAMES[-1] in human.stdout


def test_migrate_on_sqlite_applies_only_what_is_missing(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    with sqlite3.connect(tmp_path / "ledger.db") as conn:  # a ledger from before the last migration
        conn.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for name, script in SQLITE_MIGRATIONS[:-1]:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))

    done = migrate(config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"applied {NAMES[-1]}"
    assert f"applied {NAMES[0]}" not in done.stdout


def test_migrate_on_a_postgres_schema_is_idempotent(tmp_path: Path) -> None:
    spec = StoreSpec.fresh("postgres", tmp_path)
    config = write_config(
        tmp_path, {"weather": "http://127.0.0.1:9/mcp"}, database=f"{spec.location}?schema={spec.schema}"
    )

    async def tables() -> set[str]:
        conn = await asyncpg.connect(spec.location)
        try:
            rows = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", spec.schema
            )
            return {row[0] for row in rows}
        finally:
            await conn.close()

    try:
        assert run_sync(tables()) == set()
        first = migrate(config, "--json")
        assert first.returncode == 0, first.stderr
        report = json.loads(first.stdout)
        assert report["applied"] == EVERY
        assert report["database"].endswith(f"?schema={spec.schema}")
        assert {"accounts", "transfers", "postings", "holds", "charges", "payouts", "schema_migrations"} <= run_sync(
            tables()
        )
        assert {"logins", "oauth_grants", "stripe_topups"} <= run_sync(tables())  # the side concerns' too
        assert run_sync(spec.fetchval("SELECT COUNT(*) FROM accounts")) == 3

        second = migrate(config, "--json")
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stdout) == {**report, "applied": []}
        assert run_sync(spec.fetchval("SELECT COUNT(*) FROM schema_migrations")) == len(EVERY)
    finally:
        run_sync(spec.drop())


def test_migrate_reports_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"weather": "http://127.0.0.1:9/mcp"}, database="postgresql://postgres@127.0.0.1:1/x"
    )
    done = migrate(config)
    assert done.returncode == 1
    assert done.stderr.startswith("agentpay: error:") and "Traceback" not in done.stderr


@pytest.fixture(autouse=True)
def _no_env_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTPAY_CONFIG", raising=False)
