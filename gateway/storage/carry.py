"""Carrying a side concern's tables from one store to another (``agentpay ledger export`` / ``import``).

A concern names the tables worth moving (``CarriedTable``: its columns and their store-neutral
types); what lives only minutes or only for one process (web sessions, sign-in links, failed
sign-ins, OAuth codes) stays behind. Rows travel as JSON objects of ``int``, ``float``, ``text`` and
``bool`` values: SQLite's 0/1 and PostgreSQL's booleans read back as the same JSON, so a dump of the
same data is the same bytes whichever store wrote it. An import writes every carried table of a
concern in one transaction and refuses a target where any of them already holds a row.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import asyncpg

from gateway.errors import Conflict, InvalidInput
from gateway.storage import open_side
from gateway.storage.migrations import Migration
from gateway.storage.postgres import Conn as PgConn
from gateway.storage.postgres import PostgresSide
from gateway.storage.sqlite import Conn as SqliteConn
from gateway.storage.sqlite import SqliteSide

Kind = Literal["int", "float", "text", "bool"]
Row = tuple[str, dict[str, Any]]  # (table, {column: value})

_IDENT = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class CarriedTable:
    """A table a concern carries: its columns in order, and what orders its rows in a dump."""

    name: str
    columns: tuple[tuple[str, Kind], ...]
    order_by: tuple[str, ...]  # columns that order the rows (a unique key: stable dumps)
    identity: bool = False  # the first column is PostgreSQL ``GENERATED ALWAYS AS IDENTITY`` (moved past on import)

    def __post_init__(self) -> None:
        names = [self.name, *(c for c, _ in self.columns), *self.order_by]
        bad = [n for n in names if not _IDENT.match(n)]
        if bad:
            raise ValueError(f"not a plain SQL identifier: {bad}")
        if not set(self.order_by) <= {c for c, _ in self.columns}:
            raise ValueError(f"{self.name}: order_by names a column the table does not carry")

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]


@dataclass(frozen=True, slots=True)
class Carried:
    """What a concern carries: its side store's migrations (to open it on the target) and its tables
    in the order they are written (a table after those it references)."""

    concern: str
    sqlite_migrations: Sequence[Migration]
    postgres_migrations: Sequence[Migration]
    tables: tuple[CarriedTable, ...]

    def open_side(self, database_url: str) -> SqliteSide | PostgresSide:
        """The concern's side store on ``database_url`` (not yet opened; opening applies its migrations)."""
        return open_side(
            database_url,
            concern=self.concern,
            sqlite_migrations=self.sqlite_migrations,
            postgres_migrations=self.postgres_migrations,
        )


def _neutral(value: Any, kind: Kind) -> Any:
    """A stored value as the dump writes it."""
    if value is None:
        return None
    if kind == "bool":
        return bool(value)
    if kind == "float":
        return float(value)
    return value


def _select(table: CarriedTable) -> str:
    return f"SELECT {', '.join(table.names)} FROM {table.name} ORDER BY {', '.join(table.order_by)}"


async def export_rows(side: SqliteSide | PostgresSide, tables: Sequence[CarriedTable]) -> list[Row]:
    """Every row of ``tables``, table by table, from one consistent snapshot."""

    def rows_of(table: CarriedTable, fetched: Iterable[Sequence[Any]]) -> list[Row]:
        return [
            (table.name, {name: _neutral(v, kind) for (name, kind), v in zip(table.columns, row, strict=True)})
            for row in fetched
        ]

    if isinstance(side, SqliteSide):

        def read(conn: SqliteConn) -> list[Row]:
            return [row for t in tables for row in rows_of(t, conn.execute(_select(t)).fetchall())]

        return await side.read(read)

    async def fetch(conn: PgConn) -> list[Row]:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        out: list[Row] = []
        for t in tables:
            out.extend(rows_of(t, await conn.fetch(_select(t))))
        return out

    return await side.transaction(fetch)


def _stored(value: Any, kind: Kind, *, sqlite: bool) -> Any:
    """A dump's value as the store keeps it (SQLite has no booleans)."""
    if value is None:
        return None
    if kind == "bool" and sqlite:
        return int(bool(value))
    if kind == "float":
        return float(value)
    return value


async def import_rows(
    side: SqliteSide | PostgresSide, tables: Sequence[CarriedTable], rows: Sequence[Row], *, dry_run: bool = False
) -> dict[str, int]:
    """Insert ``rows`` (of ``tables`` only) in one transaction; Conflict when a table is not empty
    (``dry_run``: only that check), InvalidInput when a row breaks one of the tables' rules."""
    try:
        return await _import(side, tables, rows, dry_run)
    except (sqlite3.IntegrityError, asyncpg.IntegrityConstraintViolationError) as exc:
        raise InvalidInput(
            f"the dump's records break a rule of the target's tables: {exc}",
            hint="Import a dump written by `agentpay ledger export`, unedited",
        ) from None


async def _import(
    side: SqliteSide | PostgresSide, tables: Sequence[CarriedTable], rows: Sequence[Row], dry_run: bool
) -> dict[str, int]:
    by_table: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tables}
    for table, row in rows:
        by_table[table].append(row)
    counts = {t.name: len(by_table[t.name]) for t in tables}

    def refuse_full(full: list[str]) -> None:
        if full:
            raise Conflict(
                f"the target is not empty: {', '.join(full)} already hold rows",
                hint="Import into a new, empty database",
            )

    if isinstance(side, SqliteSide):

        def write(conn: SqliteConn) -> None:
            refuse_full([t.name for t in tables if conn.execute(f"SELECT 1 FROM {t.name} LIMIT 1").fetchone()])
            for t in [] if dry_run else tables:
                values = [[_stored(r[c], k, sqlite=True) for c, k in t.columns] for r in by_table[t.name]]
                marks = ", ".join("?" * len(t.columns))
                conn.executemany(f"INSERT INTO {t.name} ({', '.join(t.names)}) VALUES ({marks})", values)

        await side.write(write)
        return counts

    async def insert(conn: PgConn) -> None:
        refuse_full([t.name for t in tables if await conn.fetchval(f"SELECT 1 FROM {t.name} LIMIT 1")])
        for t in [] if dry_run else tables:
            values = [[_stored(r[c], k, sqlite=False) for c, k in t.columns] for r in by_table[t.name]]
            marks = ", ".join(f"${i}" for i in range(1, len(t.columns) + 1))
            override = " OVERRIDING SYSTEM VALUE" if t.identity else ""
            if values:
                await conn.executemany(
                    f"INSERT INTO {t.name} ({', '.join(t.names)}){override} VALUES ({marks})", values
                )
            if t.identity and values:  # the next generated id follows the carried ones
                column = t.columns[0][0]
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{t.name}', '{column}'), "
                    f"(SELECT MAX({column}) FROM {t.name}))"
                )

    await side.transaction(insert)
    return counts
