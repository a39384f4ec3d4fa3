"""Side stores beside the ledger (``gateway.storage``): named migrations per concern, each applied in
the same transaction as its record, on a real SQLite file and a fresh PostgreSQL schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.errors import InvalidInput, Unavailable
from gateway.storage import PostgresSide, SqliteSide, check_migrations, open_side
from tests.ledger.conftest import STORES, StoreSpec
from tests.logins.conftest import database_url

GOOD = (("notes_0001_initial", "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT NOT NULL);"),)
BROKEN = (
    *GOOD,
    (
        "notes_0002_half",
        "CREATE TABLE notes_extra (id INTEGER PRIMARY KEY);\nCREATE TABLE notes (id INTEGER PRIMARY KEY);",
    ),
)


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreSpec]:
    spec = StoreSpec.fresh(request.param, tmp_path)
    try:
        yield spec
    finally:
        await spec.drop()


def side(spec: StoreSpec, migrations: tuple[tuple[str, str], ...]) -> SqliteSide | PostgresSide:
    return open_side(database_url(spec), concern="notes", sqlite_migrations=migrations, postgres_migrations=migrations)


@pytest.mark.parametrize(
    "migrations",
    [
        (("0001_initial", "SELECT 1;"),),  # no concern prefix: would collide with the ledger's
        (("other_0001_initial", "SELECT 1;"),),
        (("notes_0002_initial", "SELECT 1;"),),  # out of order
    ],
)
def test_a_concern_migration_must_carry_the_concern_and_its_number(migrations: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError, match="must be named notes_"):
        check_migrations("notes", migrations)


async def test_a_side_store_records_its_migrations_beside_the_ledgers_once(store: StoreSpec) -> None:
    ledger = store.open()
    await ledger.open()
    try:
        notes = side(store, GOOD)
        await notes.open()
        await notes.close()
        again = side(store, GOOD)
        await again.open()
        try:
            assert await again.applied_migrations() == ["notes_0001_initial"]
        finally:
            await again.close()
        names = await ledger.applied_migrations()
        assert "notes_0001_initial" in names and "0001_initial" in names
    finally:
        await ledger.close()


async def test_a_failing_migration_leaves_no_table_without_its_record(store: StoreSpec) -> None:
    ledger = store.open()  # the ledger's schema first, as the gateway opens them
    await ledger.open()
    await ledger.close()
    broken = side(store, BROKEN)
    with pytest.raises(Unavailable, match=r"cannot open|database failed"):
        await broken.open()
    exists = (
        "SELECT COUNT(*) FROM sqlite_master WHERE name = ?"
        if store.kind == "sqlite"
        else "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = ?"
    )
    recorded = "SELECT COUNT(*) FROM schema_migrations WHERE name = ?"
    assert await store.fetchval(exists, "notes_extra") == 0  # 0002 rolled back as a whole
    assert await store.fetchval(recorded, "notes_0002_half") == 0
    # SQLite applies each migration in its own transaction, PostgreSQL all of them in one (under the
    # schema's lock): either way a table is there exactly when its migration is recorded
    assert await store.fetchval(exists, "notes") == await store.fetchval(recorded, "notes_0001_initial")


def test_an_unsupported_database_url_is_refused_with_what_to_write() -> None:
    with pytest.raises(InvalidInput, match="unsupported database URL"):
        open_side("mysql://x/y", concern="notes", sqlite_migrations=GOOD, postgres_migrations=GOOD)
