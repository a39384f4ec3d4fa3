"""The ledger: one interface (``Ledger``), one store per database.

``open_ledger(url)`` picks the store for a database URL; it does not connect (call ``open()``).
Importing this package has no side effects.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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
    Transfer,
    UsageRow,
    UserSummary,
)
from gateway.ledger.interfaces import Ledger

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
    "redact_url",
    "split_schema",
]

SQLITE_SCHEME = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def open_ledger(database_url: str) -> Ledger:
    """The ledger store for ``database_url``, not yet opened.

    ``sqlite:///path/to/file.db`` (the config layer makes the path absolute; a relative path is
    taken relative to the working directory) and ``sqlite:////abs/path.db`` select SQLite;
    ``postgresql://user@host:5432/db`` (or ``postgres://``) selects PostgreSQL (tables in the
    connection's default schema, normally ``public``). A ``schema`` query parameter puts the tables
    in that schema instead (created on open if missing): ``postgresql://user@host/db?schema=agentpay_x``
    opens ``PostgresLedger("postgresql://user@host/db", schema="agentpay_x")``; other query parameters
    (``sslmode=…``) stay in the DSN. Several deployments (or test runs) can share one database this way.
    """
    if database_url.startswith(SQLITE_SCHEME):
        path = database_url[len(SQLITE_SCHEME) :]
        if not path:
            raise InvalidInput(f"database URL {database_url!r} names no file", hint="Use sqlite:///path/to/agentpay.db")
        from gateway.ledger.sqlite import SqliteLedger

        return SqliteLedger(path)
    if database_url.startswith(POSTGRES_SCHEMES):
        from gateway.ledger.postgres import PostgresLedger

        dsn, schema = split_schema(database_url)
        return PostgresLedger(dsn, schema=schema)
    raise InvalidInput(
        f"unsupported database URL {database_url.split(':', 1)[0]!r}",
        hint="Use sqlite:///path/to/agentpay.db or postgresql://user@host/db",
    )


def split_schema(database_url: str) -> tuple[str, str | None]:
    """A PostgreSQL URL without its ``schema`` query parameter, and that schema (None if absent)."""
    parts = urlsplit(database_url)
    params = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for name, value in params if name == "schema"]
    if not schemas:
        return database_url, None
    if len(schemas) > 1 or not schemas[0]:
        raise InvalidInput(
            f"database URL gives {len(schemas)} schema parameters"
            if len(schemas) > 1
            else "database URL has an empty schema",
            hint="Write postgresql://user@host/db?schema=NAME once",
        )
    rest = urlencode([(name, value) for name, value in params if name != "schema"])
    return urlunsplit(parts._replace(query=rest)), schemas[0]


def redact_url(database_url: str) -> str:
    """``database_url`` with any password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(database_url)
    if parts.password is None:
        return database_url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
