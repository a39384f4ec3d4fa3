"""Storage for the concerns that are not money (logins now; OAuth grants and payment-provider
records later), in the ledger's database but never through the ledger.

Each concern opens a *side store* on the ledger's database URL: ``SqliteSide`` (its own sqlite3
connection to the ledger's file, WAL, on one worker thread; writes are rare) or ``PostgresSide``
(a small asyncpg pool in the ledger's schema). A concern brings its own tables as named migrations,
``<concern>_0001_...``, recorded in the ledger's ``schema_migrations`` table, each applied in the
same transaction as its record. ``open_side(url, ...)`` picks the store as ``open_ledger`` does.
Importing this package has no side effects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from gateway.errors import InvalidInput
from gateway.ledger import split_schema
from gateway.storage.migrations import Migration, check_migrations
from gateway.storage.postgres import PostgresSide
from gateway.storage.sqlite import SqliteSide

__all__ = ["Migration", "PostgresSide", "SqliteSide", "check_migrations", "open_side"]

_SQLITE_SCHEME = "sqlite:///"
_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_side(
    database_url: str,
    *,
    concern: str,
    sqlite_migrations: Sequence[Migration],
    postgres_migrations: Sequence[Migration],
    clock: Callable[[], float] = time.time,
) -> SqliteSide | PostgresSide:
    """The side store of ``concern`` on the ledger's database (not yet opened)."""
    if database_url.startswith(_SQLITE_SCHEME):
        path = database_url[len(_SQLITE_SCHEME) :]
        if not path:
            raise InvalidInput(f"database URL {database_url!r} names no file", hint="Use sqlite:///path/to/agentpay.db")
        return SqliteSide(path, concern=concern, migrations=sqlite_migrations, clock=clock)
    if database_url.startswith(_POSTGRES_SCHEMES):
        dsn, schema = split_schema(database_url)
        return PostgresSide(dsn, schema=schema, concern=concern, migrations=postgres_migrations, clock=clock)
    raise InvalidInput(
        f"unsupported database URL {database_url.split(':', 1)[0]!r}",
        hint="Use sqlite:///path/to/agentpay.db or postgresql://user@host/db",
    )
