"""A side store in the ledger's PostgreSQL database and schema: a small asyncpg pool of its own.

Its migrations run under the same transaction-level advisory lock as the ledger's (keyed by the
schema), so a replica migrating the ledger and another migrating a concern never race to create
``schema_migrations`` or the schema itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg

from gateway.errors import GatewayError, InvalidInput, Unavailable
from gateway.storage.migrations import POSTGRES_SCHEMA_MIGRATIONS, Migration, check_migrations

T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection[Any]"

# pg_advisory_xact_lock(classid, objid) as the ledger takes it (``ledger.postgres.store``): "APLG", the schema.
_MIGRATION_LOCK_CLASS = 0x41504C47
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
ACQUIRE_TIMEOUT_S = 10.0
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresSide:
    """One concern's pool in the ledger's PostgreSQL database."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None,
        concern: str,
        migrations: Sequence[Migration],
        clock: Callable[[], float] = time.time,
        max_size: int = 4,
    ) -> None:
        check_migrations(concern, migrations)
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise InvalidInput(f"schema name {schema!r} must be 1-63 letters, digits or '_'")
        self.dsn = dsn
        self.schema = schema
        self.concern = concern
        self._migrations = tuple(migrations)
        self._clock = clock
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        if self._pool is not None:
            return
        settings = {
            "application_name": f"agentpay-{self.concern}",
            "lock_timeout": "30s",
            "idle_in_transaction_session_timeout": "60s",
        }
        if self.schema is not None:
            settings["search_path"] = _quote_ident(self.schema)
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=self._max_size, server_settings=settings, timeout=ACQUIRE_TIMEOUT_S
            )
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"cannot connect to the database: {exc}",
                hint="Check that PostgreSQL is running and the database URL is right",
            ) from exc
        except asyncpg.PostgresError as exc:
            raise Unavailable(f"cannot open the database: {exc}", hint="Check the database URL") from exc
        try:
            await self.transaction(self._tx_migrate)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await pool.close()
        except _CONNECTION_ERRORS:
            pool.terminate()

    async def _tx_migrate(self, conn: Conn) -> None:
        await conn.execute("SET LOCAL lock_timeout = '120s'")
        if self.schema is not None:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _MIGRATION_LOCK_CLASS, self.schema)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}")
            await conn.execute(f"SET LOCAL search_path TO {_quote_ident(self.schema)}")
        else:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(COALESCE(current_schema(), '')))", _MIGRATION_LOCK_CLASS
            )
        await conn.execute(POSTGRES_SCHEMA_MIGRATIONS)
        applied = {row[0] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, script in self._migrations:
            if name in applied:
                continue
            await conn.execute(script)  # no arguments: the simple protocol runs every statement
            await conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, $2)", name, float(self._clock())
            )

    async def transaction(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """``fn(conn)`` in one READ COMMITTED transaction on a pooled connection. A unique or
        check violation reaches the caller as asyncpg raised it (the concern names it); other
        database failures are Unavailable."""
        if self._pool is None:
            raise Unavailable(f"the {self.concern} store is not open")
        try:
            async with self._pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
                return await fn(conn)
        except (GatewayError, asyncpg.IntegrityConstraintViolationError):
            raise
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"lost the connection to the database ({type(exc).__name__}: {exc})",
                hint="Retry shortly; check that PostgreSQL is up",
            ) from exc
        except asyncpg.PostgresError as exc:
            raise Unavailable(f"the database failed ({exc.sqlstate}: {exc})", hint="Retry shortly") from exc

    async def applied_migrations(self) -> list[str]:
        async def tx(conn: Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT name FROM schema_migrations WHERE left(name, $1) = $2 ORDER BY name",
                len(self.concern) + 1,
                f"{self.concern}_",
            )
            return [row[0] for row in rows]

        return await self.transaction(tx)
