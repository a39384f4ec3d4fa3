"""The ledger: one interface (``Ledger``), one store per database.

``open_ledger(url)`` picks the store for a database URL; it does not connect (call ``open()``).
Importing this package has no side effects.
"""

from __future__ import annotations

from gateway.errors import InvalidInput
from gateway.ledger.base import (
    Account,
    AccountKind,
    Charge,
    Earnings,
    HoldOutcome,
    HoldRequest,
    HoldState,
    HoldStatus,
    KeyRecord,
    Ledger,
    Transfer,
    UsageRow,
    UserSummary,
)

__all__ = [
    "Account",
    "AccountKind",
    "Charge",
    "Earnings",
    "HoldOutcome",
    "HoldRequest",
    "HoldState",
    "HoldStatus",
    "KeyRecord",
    "Ledger",
    "Transfer",
    "UsageRow",
    "UserSummary",
    "open_ledger",
]

SQLITE_SCHEME = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_ledger(database_url: str) -> Ledger:
    """The ledger store for ``database_url``, not yet opened.

    ``sqlite:///path/to/file.db`` (the config layer makes the path absolute; a relative path is
    taken relative to the working directory) and ``sqlite:////abs/path.db`` select SQLite;
    ``postgresql://user@host:5432/db`` (or ``postgres://``) selects PostgreSQL (tables in the
    connection's default schema, normally ``public``).
    """
    if database_url.startswith(SQLITE_SCHEME):
        path = database_url[len(SQLITE_SCHEME) :]
        if not path:
            raise InvalidInput(f"database URL {database_url!r} names no file", hint="Use sqlite:///path/to/agentpay.db")
        from gateway.ledger.sqlite import SqliteLedger

        return SqliteLedger(path)
    if database_url.startswith(POSTGRES_SCHEMES):
        from gateway.ledger.postgres import PostgresLedger

        return PostgresLedger(database_url)
    raise InvalidInput(
        f"unsupported database URL {database_url.split(':', 1)[0]!r}",
        hint="Use sqlite:///path/to/agentpay.db or postgresql://user@host/db",
    )
