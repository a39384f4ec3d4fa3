"""The PostgreSQL ledger's machinery and its ``Store`` concern: ``PostgresStore``, the base every
concern's mixin extends.

It owns the two connection pools (one for reads and one-off transactions, one reserved for the
group-commit batches), the schema's ``search_path``, the migrations (applied under the schema's
advisory lock, ``_tx_migrate``) and the system accounts; it runs a function as one transaction with
the retry rules of the package docstring (``_run``, ``_read``) and maps database errors to gateway
errors (``_translate``). It also holds the steps several concerns take inside a transaction
(``_account_id``, ``_lock_accounts``, ``_post``, ``_insert_transfer``, ``_account_row``), and
declares the state of group commit and of the lone path for the mixins that use it (``batching``,
``lone``).
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Self

import asyncpg

from gateway.errors import (
    AlreadyExists,
    BalanceLimitExceeded,
    Conflict,
    GatewayError,
    InvalidInput,
    NotFound,
    Unavailable,
)
from gateway.ledger.base import MAX_BALANCE, Account, AccountKind
from gateway.ledger.postgres.common import (
    _CONNECTION_ERRORS,
    _RETRYABLE,
    _SYSTEM_KINDS,
    _TIMED_OUT,
    SYSTEM_NAME,
    Conn,
    Row,
    T,
    _Op,
    _quote_ident,
    _RaceLost,
    _Rollback,
    _WouldGoNegative,
)
from gateway.ledger.postgres.migrations import BALANCE_LIMIT_CONSTRAINT, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE
from gateway.ledger.rows import balance_limit_error, within_balance_limit

# pg_advisory_xact_lock(classid, objid): classid says "AgentPay ledger migrations", objid is the schema.
_MIGRATION_LOCK_CLASS = 0x41504C47
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_ATTEMPTS = 6
ACQUIRE_TIMEOUT_S = 10.0
SETTLE_POOL_SIZE = 4  # connections reserved for the group-commit batches (holds, captures, voids, renewals)
BATCH_WORKERS = 1  # batches of one process in flight at once (each on its own connection)
DRAIN_ON_CLOSE_S = 10.0  # close() lets queued operations finish for this long


async def _keep_session(conn: Conn) -> None:
    """Release a settle connection without the default reset query (a round trip per batch while a
    lone caller keeps the drainer acquiring and releasing): these connections set nothing at session
    level (only ``set_config(..., true)``, local to a transaction), take no advisory locks, open no
    cursors and listen to nothing. asyncpg still rolls back a transaction left open."""


def _translate(exc: asyncpg.PostgresError) -> GatewayError:
    """A database error that escaped the guards, as a gateway error with a clear message."""
    constraint = getattr(exc, "constraint_name", None) or "?"
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists(f"the ledger already has a record with this key ({constraint})")
    if isinstance(exc, asyncpg.CheckViolationError) and constraint == BALANCE_LIMIT_CONSTRAINT:
        return BalanceLimitExceeded(f"Refused by the ledger database: a balance would leave +-{MAX_BALANCE} millicents")
    if isinstance(exc, asyncpg.CheckViolationError):
        return Conflict(f"the ledger refused a write that would break one of its rules ({constraint})")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return Conflict(f"the ledger refused a write that refers to a missing record ({constraint})")
    return GatewayError(f"ledger database error: {type(exc).__name__}: {exc}")


class PostgresStore:
    """The machinery every concern runs on (pools, transactions and retries, migrations, system
    accounts, shared steps) and the ``Store`` concern: open, close, migrate."""

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] = time.time,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        batch_workers: int = BATCH_WORKERS,
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise InvalidInput(
                f"schema name {schema!r} must be 1-63 letters, digits or '_' (not starting with a digit)"
            )
        # < the pool: a drainer that falls back to one operation at a time takes a second connection
        if not 1 <= batch_workers < SETTLE_POOL_SIZE:
            raise InvalidInput(f"batch_workers must be between 1 and {SETTLE_POOL_SIZE - 1}, got {batch_workers!r}")
        self.dsn = dsn
        self.schema = schema
        self._clock = clock
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        # The group-commit batches (holds, captures, voids, renewals) run on connections of their
        # own, never queued behind reads or top-ups for a pooled connection.
        self._settle_pool: asyncpg.Pool | None = None
        self._lone_path = True  # off once its functions turn out to be missing: see _run_lone
        self._system: dict[AccountKind, int] = {}
        # Group commit (see ``_submit``): queued operations, the call ids of batches in flight, and
        # the tasks draining the queue (at most ``batch_workers``).
        self._batch_workers = batch_workers
        self._queue: deque[_Op] = deque()
        self._busy: set[str] = set()
        self._drainers: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        settings = {
            "application_name": "agentpay-ledger",
            "lock_timeout": "30s",
            "idle_in_transaction_session_timeout": "60s",
        }
        if self.schema is not None:
            settings["search_path"] = _quote_ident(self.schema)
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=settings,
                timeout=ACQUIRE_TIMEOUT_S,
            )
            # The batch statements take arrays: a custom plan per execution costs more than the
            # batch itself, and the generic plan (index lookups per element) fits every size. A
            # generic plan is made once per connection, often while the tables are still small,
            # where a sequential scan looks cheapest, and then kept while the tables grow (until an
            # ANALYZE invalidates it): every lookup here is by a unique key, so never plan a scan.
            self._settle_pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=SETTLE_POOL_SIZE,
                server_settings=settings | {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"},
                timeout=ACQUIRE_TIMEOUT_S,
                init=self._init_settle_connection,
                reset=_keep_session,
            )
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"cannot connect to the ledger database: {exc}",
                hint="Check that PostgreSQL is running and the database URL is right",
            ) from exc
        except asyncpg.PostgresError as exc:  # e.g. unknown database or role
            raise Unavailable(f"cannot open the ledger database: {exc}", hint="Check the database URL") from exc
        try:
            self._system = await self._run(self._tx_migrate, idempotent=True)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._drainers:  # let operations already queued finish (or fail) before the pools go
            _, late = await asyncio.wait(set(self._drainers), timeout=DRAIN_ON_CLOSE_S)
            for task in late:  # cancelled drainers answer their callers (Unavailable) on the way out
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        pools = (self._pool, self._settle_pool)
        self._pool = self._settle_pool = None
        for pool in pools:
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except _CONNECTION_ERRORS:  # includes TimeoutError
                pool.terminate()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- migrations -----------------------------------------------------------------------------
    async def _tx_migrate(self, conn: Conn) -> dict[AccountKind, int]:
        """Apply missing migrations and create the system accounts, holding the schema's advisory
        lock for the whole transaction so replicas starting together apply each migration once."""
        await conn.execute("SET LOCAL lock_timeout = '120s'")
        if self.schema is not None:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _MIGRATION_LOCK_CLASS, self.schema)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}")
            await conn.execute(f"SET LOCAL search_path TO {_quote_ident(self.schema)}")
        else:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(COALESCE(current_schema(), '')))", _MIGRATION_LOCK_CLASS
            )
        await conn.execute(SCHEMA_MIGRATIONS_TABLE)
        applied = {row[0] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, script in MIGRATIONS:
            if name in applied:
                continue
            await conn.execute(script)  # no arguments: the simple protocol runs every statement
            await conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, $2)", name, float(self._clock())
            )
        now = self._clock()
        ids: dict[AccountKind, int] = {}
        for kind in _SYSTEM_KINDS:
            await conn.execute(
                "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (kind, name) DO NOTHING",
                kind.value,
                SYSTEM_NAME,
                now,
            )
            ids[kind] = await conn.fetchval(
                "SELECT id FROM accounts WHERE kind = $1 AND name = $2", kind.value, SYSTEM_NAME
            )
        return ids

    async def _applied_before_open(self) -> set[str]:
        """Migrations recorded in the schema before this ledger opened it (none if it has no tables)."""
        try:
            conn = await asyncpg.connect(self.dsn, timeout=ACQUIRE_TIMEOUT_S)
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"cannot connect to the ledger database: {exc}",
                hint="Check that PostgreSQL is running and the database URL is right",
            ) from exc
        except asyncpg.PostgresError as exc:
            raise Unavailable(f"cannot open the ledger database: {exc}", hint="Check the database URL") from exc
        try:
            schema = self.schema if self.schema is not None else await conn.fetchval("SELECT current_schema()")
            if schema is None:
                return set()
            table = await conn.fetchval("SELECT to_regclass(format('%I.schema_migrations', $1::text))", schema)
            if table is None:
                return set()
            rows = await conn.fetch(f"SELECT name FROM {_quote_ident(schema)}.schema_migrations")
            return {row[0] for row in rows}
        finally:
            await conn.close()

    async def migrate(self) -> list[str]:
        if self._pool is not None:
            before = set(await self.applied_migrations())
        else:
            before = await self._applied_before_open()
            await self.open()
        after = set(await self.applied_migrations())
        return [name for name, _ in MIGRATIONS if name in after and name not in before]

    async def applied_migrations(self) -> list[str]:
        async def tx(conn: Conn) -> list[str]:
            return [row[0] for row in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]

        return await self._read(tx)

    # --- transactions ---------------------------------------------------------------------------
    @asynccontextmanager
    async def _connection(self, *, settle: bool = False) -> AsyncIterator[Conn]:
        pool = self._settle_pool if settle else self._pool
        if pool is None:
            raise Unavailable("the ledger is not open")
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn

    async def _run(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        idempotent: bool,
        isolation: str = "read_committed",
        readonly: bool = False,
        settle: bool = False,
        conn: Conn | None = None,
    ) -> T:
        """Run ``fn`` as one transaction (on ``conn`` when given, else on a pooled connection). Re-run
        it after a serialization failure or deadlock only when ``idempotent`` (see the module
        docstring); map database errors to gateway errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                if conn is not None:
                    async with conn.transaction(isolation=isolation, readonly=readonly):
                        return await fn(conn)
                async with (
                    self._connection(settle=settle) as pooled,
                    pooled.transaction(isolation=isolation, readonly=readonly),
                ):
                    return await fn(pooled)
            except _Rollback as rollback:
                return rollback.result  # type: ignore[return-value]
            except _RaceLost:
                if attempt >= MAX_ATTEMPTS:
                    raise Unavailable("the ledger kept losing an idempotency race; retry the request") from None
            except _RETRYABLE as exc:
                if not idempotent or attempt >= MAX_ATTEMPTS:
                    raise Unavailable(
                        f"the ledger database aborted the transaction ({exc.sqlstate}: {exc}); nothing was written",
                        hint="Retry the request",
                    ) from exc
            except GatewayError:
                raise
            except _TIMED_OUT as exc:
                raise Unavailable(
                    f"the ledger database is too busy ({exc.sqlstate}: {exc}); nothing was written",
                    hint="Retry shortly",
                ) from exc
            except _CONNECTION_ERRORS as exc:
                raise Unavailable(
                    f"lost the connection to the ledger database ({type(exc).__name__}: {exc})",
                    hint="Retry shortly with the same idempotency key; check that PostgreSQL is up",
                ) from exc
            except asyncpg.PostgresError as exc:
                raise _translate(exc) from exc
            await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` in one REPEATABLE READ, READ ONLY transaction: one consistent snapshot."""
        return await self._run(fn, idempotent=True, isolation="repeatable_read", readonly=True)

    async def _init_settle_connection(self, conn: Conn) -> None:
        """Set up a new connection of the settle pool (``open``): nothing here; ``lone.PostgresLone``
        gives it the lone path's functions."""

    # --- steps several concerns take (run inside a transaction) ---------------------------------
    @staticmethod
    async def _account_id(conn: Conn, kind: AccountKind, name: str) -> int:
        account_id = await conn.fetchval("SELECT id FROM accounts WHERE kind = $1 AND name = $2", kind.value, name)
        if account_id is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return int(account_id)

    @staticmethod
    async def _lock_accounts(conn: Conn, ids: Sequence[int]) -> dict[int, Row]:
        """Lock these account rows in ascending id order (the one global lock order)."""
        rows = await conn.fetch(
            "SELECT id, kind, name, balance, held FROM accounts WHERE id = ANY($1::bigint[]) "
            "ORDER BY id FOR NO KEY UPDATE",
            sorted(set(ids)),
        )
        return {row["id"]: row for row in rows}

    @staticmethod
    async def _post(
        conn: Conn, transfer_id: str, legs: Sequence[tuple[int, int]], *, unguarded: Collection[int] = ()
    ) -> None:
        """Write balanced postings and apply them to balances (accounts already locked by the
        caller when there are several). A debit that would take a non-world account's available
        balance below zero raises ``_WouldGoNegative`` (a credit always passes: a user in debt after a
        clawback can be topped up or refunded; so does a debit of an ``unguarded`` account: a capture,
        bounded by its hold, and a clawback); one that would take any balance outside
        +-MAX_BALANCE raises BalanceLimitExceeded (the transaction then rolls back)."""
        legs = [(account, amount) for account, amount in legs if amount != 0]
        if sum(amount for _, amount in legs) != 0:
            raise AssertionError(f"unbalanced transfer {transfer_id}: {legs}")
        if not legs:
            return
        await conn.execute(
            "INSERT INTO postings (transfer_id, account_id, amount) "
            "SELECT $1, a, m FROM unnest($2::bigint[], $3::bigint[]) AS l (a, m)",
            transfer_id,
            [account for account, _ in legs],
            [amount for _, amount in legs],
        )
        by_account: dict[int, int] = defaultdict(int)
        for account, amount in legs:
            by_account[account] += amount
        for account in sorted(by_account):
            amount = by_account[account]
            # Checked arithmetic: a leg is at most MAX_AMOUNT and a balance within +-MAX_BALANCE, so the sum
            # cannot leave BIGINT; a sum out of range updates nothing and is refused below.
            # A credit also lowers a user's debt (migration 0010) to the shortfall it leaves, if any.
            updated = await conn.fetchval(
                "UPDATE accounts SET balance = balance + $1, "
                "debt = CASE WHEN $1 > 0 AND debt > 0 THEN GREATEST(0, LEAST(debt, held - balance - $1)) ELSE debt END "
                "WHERE id = $2 AND (kind = 'world' OR NOT $5 OR balance - held + $1 >= 0) "
                "AND balance + $1 BETWEEN $3 AND $4 RETURNING id",
                amount,
                account,
                -MAX_BALANCE,
                MAX_BALANCE,
                amount < 0 and account not in unguarded,
            )
            if updated is None:
                row = await conn.fetchrow("SELECT kind, name, balance FROM accounts WHERE id = $1", account)
                if row is not None and not within_balance_limit(int(row[2]) + amount):
                    raise balance_limit_error(row[0], row[1], int(row[2]), amount)
                raise _WouldGoNegative(account)

    @staticmethod
    async def _insert_transfer(
        conn: Conn,
        transfer_id: str,
        kind: str,
        amount: int,
        reference: str | None,
        account_id: int | None,
        charge_id: str | None,
        now: float,
    ) -> None:
        """Insert a transfer; a concurrent one with the same (kind, reference) raises ``_RaceLost``."""
        inserted = await conn.fetchval(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, charge_id, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (kind, reference) WHERE reference IS NOT NULL DO NOTHING RETURNING id",
            transfer_id,
            kind,
            amount,
            reference,
            account_id,
            charge_id,
            now,
        )
        if inserted is None:
            raise _RaceLost

    @staticmethod
    async def _account_row(conn: Conn, kind: AccountKind, name: str) -> Account:
        row = await conn.fetchrow(
            "SELECT id, kind, name, balance, held FROM accounts WHERE kind = $1 AND name = $2", kind.value, name
        )
        if row is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return Account(id=row[0], kind=AccountKind(row[1]), name=row[2], balance=row[3], held=row[4])
