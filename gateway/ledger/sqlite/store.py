"""The SQLite ledger.

One dedicated writer thread owns the only write connection. Every money operation is *one*
Python function run on that thread, inside ``BEGIN IMMEDIATE`` … ``COMMIT``: one thread hop per
transaction, not per statement. Reads run on a second thread with its own connection (WAL lets
readers proceed while the writer writes).

Correctness never depends on a Python read-then-write: overdrafts and spending caps are refused by
conditional ``UPDATE``s (zero rows updated = refused) and backed by ``CHECK`` constraints, so it
also holds when several processes (the gateway and the CLI) open the same file.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sqlite3
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from gateway.errors import (
    AlreadyExists,
    BalanceLimitExceeded,
    Conflict,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    Unavailable,
)
from gateway.ledger import sqlite_batch
from gateway.ledger.base import (
    EXPORT_COLUMNS,
    EXPORT_TABLES,
    MAX_BALANCE,
    Account,
    AccountKind,
    Charge,
    ChargeResult,
    Earnings,
    EarningsBreakdown,
    ExportRow,
    HoldInfo,
    HoldOutcome,
    HoldRequest,
    HoldState,
    HoldStatus,
    KeyRecord,
    Payout,
    PayoutState,
    ServiceToken,
    StatementLine,
    Transfer,
    UsageRow,
    UserSummary,
    charge_id_for,
)
from gateway.ledger.dump import check_row
from gateway.ledger.migrations_sqlite import BALANCE_LIMIT_TRIGGER, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE
from gateway.ledger.rows import HOLD_INSERT_COLUMNS, balance_limit_error, hold_row, within_balance_limit
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import hold_info as _hold_info
from gateway.ledger.rows import key_record as _key_record
from gateway.ledger.rows import payout as _payout
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_limit as _require_limit
from gateway.ledger.rows import require_name as _require_name
from gateway.ledger.write_turns import WriteTurns
from gateway.money import format_cents

T = TypeVar("T")
Conn = sqlite3.Connection

SYSTEM_NAME = "system"
_SYSTEM_KINDS = (AccountKind.WORLD, AccountKind.PLATFORM_FEE, AccountKind.PAYOUT_CLEARING)
BUSY_TIMEOUT_MS = 5000

_KEY_COLUMNS = """
    k.id, a.name, k.server, k.prefix, k.created_at, k.expires_at, k.revoked_at,
    k.spend_limit, k.spent, k.held
    FROM keys k JOIN accounts a ON a.id = k.user_account_id
"""
_CHARGE_COLUMNS = """
    c.id, c.call_id, u.name, d.name, h.server, h.method, h.name, c.amount, c.fee, c.refunded,
    c.created_at, c.balance_after
    FROM charges c
    JOIN holds h ON h.call_id = c.call_id
    JOIN accounts u ON u.id = c.user_account_id
    JOIN accounts d ON d.id = c.developer_account_id
"""
_TOKEN_COLUMNS = """
    t.id, a.name, t.servers, t.prefix, t.created_at, t.revoked_at
    FROM service_tokens t JOIN accounts a ON a.id = t.developer_account_id
"""
_HOLD_COLUMNS = """
    h.call_id, u.name, d.name, h.server, h.method, h.name, h.amount, h.fee, h.state, h.created_at,
    h.lease_expires_at, h.charge_id
    FROM holds h
    JOIN accounts u ON u.id = h.user_account_id
    JOIN accounts d ON d.id = h.developer_account_id
"""
_PAYOUT_COLUMNS = """
    p.id, a.name, p.amount, p.state, p.reference, p.created_at, p.completed_at
    FROM payouts p JOIN accounts a ON a.id = p.developer_account_id
"""


# export_rows: one query per table, columns in EXPORT_COLUMNS order, rows in dependency order (a
# refund after the charge it names; charges in insertion order, which user_summary relies on).
_EXPORT_QUERIES: dict[str, str] = {
    "accounts": "SELECT id, kind, name, balance, held, created_at FROM accounts ORDER BY id",
    "transfers": "SELECT id, kind, amount, reference, account_id, charge_id, created_at FROM transfers "
    "ORDER BY charge_id IS NOT NULL, created_at, id",
    "postings": "SELECT id, transfer_id, account_id, amount FROM postings ORDER BY id",
    "keys": "SELECT id, user_account_id, server, key_hash, prefix, created_at, expires_at, revoked_at, "
    "spend_limit, spent, held FROM keys ORDER BY created_at, id",
    "holds": "SELECT call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee, "
    "state, owner, created_at, lease_expires_at, settled_at, charge_id FROM holds ORDER BY created_at, call_id",
    "charges": "SELECT id, call_id, user_account_id, developer_account_id, amount, fee, refunded, balance_after, "
    "created_at FROM charges ORDER BY rowid",
    "service_tokens": "SELECT id, developer_account_id, servers, token_hash, prefix, created_at, revoked_at "
    "FROM service_tokens ORDER BY created_at, id",
    "payouts": "SELECT p.id, p.developer_account_id, p.amount, p.state, p.reference, "
    "(SELECT t.id FROM transfers t WHERE t.kind = 'payout' AND t.reference = p.id), p.created_at, p.completed_at "
    "FROM payouts p ORDER BY p.created_at, p.id",
}


_Pending = tuple[Callable[[Conn], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop, bool, tuple[str, Any] | None]
"""A queued write: (one-at-a-time function, caller's future, its loop, durable?, (batch kind, argument))."""

_Settled = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", bool, Any]
"""An answer on its way to a caller: (its loop, its future, ok?, result or exception)."""

_MAX_GROUP = 512  # most writes committed together


def _storage_error(exc: BaseException) -> BaseException:
    """A raw sqlite3 error (disk full, I/O error, locked past the timeout) as the gateway's
    Unavailable, so callers answer 503 and background loops keep running. The balance-limit triggers'
    refusal (a write that escaped the stores' own checks) is BalanceLimitExceeded instead."""
    if isinstance(exc, sqlite3.IntegrityError) and str(exc).startswith(BALANCE_LIMIT_TRIGGER):
        refused = BalanceLimitExceeded(f"Refused by the ledger database: {exc}")
        refused.__cause__ = exc
        return refused
    if isinstance(exc, sqlite3.Error):
        error = Unavailable(
            f"the ledger database failed: {exc}", hint="Nothing was written; retry shortly or check the disk"
        )
        error.__cause__ = exc
        return error
    return exc


def _settle_future(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; the write itself stands
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(_storage_error(value))


def _settle_all(settled: Sequence[_Settled]) -> None:
    """From a ledger thread: answer callers, one wake-up per event loop rather than per caller."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
    for loop, future, ok, value in settled:
        by_loop.setdefault(loop, []).append((future, ok, value))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle_futures, answers)
        except RuntimeError:  # that loop is closed: nobody is left to answer (the writes stand)
            continue


def _settle_futures(settled: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in settled:
        _settle_future(future, ok, value)


class _Rollback(Exception):
    """Raised inside a write transaction to roll it back and still return ``result``."""

    def __init__(self, result: object) -> None:
        super().__init__("rollback")
        self.result = result


class _WouldGoNegative(Exception):
    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} would go negative")
        self.account_id = account_id


def _statements(script: str) -> Iterator[str]:
    """Split a migration script into complete statements (triggers included)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf.strip()
            buf = ""
    if buf.strip() and not all(not ln.strip() or ln.strip().startswith("--") for ln in buf.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buf.strip()[:80]!r}")


def _service_token(row: Sequence[Any]) -> ServiceToken:
    return ServiceToken(
        id=row[0],
        developer=row[1],
        servers=tuple(json.loads(row[2])),
        prefix=row[3],
        created_at=row[4],
        revoked_at=row[5],
    )


def _resolve_id_or_prefix(conn: Conn, table: str, what: str, id_or_prefix: str) -> str:
    """The id of the one row of ``table`` (keys, service_tokens) whose id is ``id_or_prefix`` or
    whose id or display prefix starts with it. Raises NotFound, or InvalidInput when ambiguous."""
    row = conn.execute(f"SELECT id FROM {table} WHERE id = ?", (id_or_prefix,)).fetchone()
    if row is not None:
        return str(row[0])
    n = len(id_or_prefix)
    matches = [
        r[0]
        for r in conn.execute(
            f"SELECT id FROM {table} WHERE substr(prefix, 1, ?) = ? OR substr(id, 1, ?) = ? ORDER BY id",
            (n, id_or_prefix, n, id_or_prefix),
        ).fetchall()
    ]
    if not matches:
        raise NotFound(f"no {what} with id or prefix {id_or_prefix!r}")
    if len(matches) > 1:
        raise InvalidInput(
            f"{id_or_prefix!r} matches {len(matches)} {what}s ({', '.join(matches[:5])}"
            f"{', …' if len(matches) > 5 else ''})",
            hint=f"Give the {what} id or more characters of the prefix",
        )
    return str(matches[0])


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SqliteLedger:
    """``Ledger`` on one SQLite file. Safe to open from several processes at once."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._writer: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._wconn: Conn | None = None
        self._rconn: Conn | None = None
        self._system: dict[AccountKind, int] = {}
        self._queue_lock = threading.Lock()
        self._flush_scheduled = False
        self._syncer: ThreadPoolExecutor | None = None
        self._sync_lock = threading.Lock()
        self._sync_scheduled = False
        self._sync_waiting: list[_Settled] = []
        self._wal_fd: int | None = None  # used on the syncer thread only
        self._turns: WriteTurns | None = None  # this process's turns at writing the file, among all its writers
        self._fsync_failed: str | None = None  # once an fsync failed, nothing is durable any more
        self._pending_writes: deque[_Pending] = deque()

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._wconn is not None:
            return
        loop = asyncio.get_running_loop()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-reader")
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-sync")
        self._fsync_failed = None
        try:
            self._wconn = await loop.run_in_executor(self._writer, self._open_writer)
            self._rconn = await loop.run_in_executor(self._reader, self._connect)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for executor, conn in ((self._writer, self._wconn), (self._reader, self._rconn)):
            if executor is None:
                continue
            if conn is not None:
                await loop.run_in_executor(executor, conn.close)
            executor.shutdown(wait=True)
        if self._syncer is not None:  # after the writer: its last commits' callers are answered
            self._syncer.shutdown(wait=True)
        if self._wal_fd is not None:
            os.close(self._wal_fd)
        if self._turns is not None:
            self._turns.close()
        self._writer = self._reader = self._syncer = None
        self._wconn = self._rconn = None
        self._wal_fd = None
        self._turns = None

    async def __aenter__(self) -> SqliteLedger:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @staticmethod
    def _enable_wal(conn: Conn) -> None:
        """Switch the file to WAL. Switching skips the busy handler, so when several processes
        open a new file at once the losers retry until the winner has switched it."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = 0.001
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)  # on the ledger's own thread, never the event loop
                delay = min(delay * 2, 0.05)

    def _connect(self) -> Conn:
        conn = sqlite3.connect(
            self.path,
            isolation_level=None,
            check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_writer(self) -> Conn:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            self._turns = WriteTurns(self.path)  # after connecting: the file exists, its owner and mode are known
            self._migrate(conn)
            self._system = self._write_txn(conn, self._tx_system_accounts)
            # Commits write their WAL frames; the syncer thread fsyncs them (see _commit_group).
            conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: Conn) -> None:
        for name, script in MIGRATIONS:

            def apply(c: Conn, name: str = name, script: str = script) -> None:
                c.execute(SCHEMA_MIGRATIONS_TABLE)
                if c.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
                    return  # applied earlier, or by another process that got here first
                for statement in _statements(script):
                    c.execute(statement)
                c.execute(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)",
                    (name, self._clock()),
                )

            self._write_txn(conn, apply)

    def _tx_system_accounts(self, conn: Conn) -> dict[AccountKind, int]:
        now = self._clock()
        ids: dict[AccountKind, int] = {}
        for kind in _SYSTEM_KINDS:
            conn.execute(
                "INSERT INTO accounts (kind, name, created_at) VALUES (?, ?, ?) ON CONFLICT (kind, name) DO NOTHING",
                (kind.value, SYSTEM_NAME, now),
            )
            ids[kind] = conn.execute(
                "SELECT id FROM accounts WHERE kind = ? AND name = ?", (kind.value, SYSTEM_NAME)
            ).fetchone()[0]
        return ids

    # --- transactions ---------------------------------------------------------------------------
    def _write_txn(self, conn: Conn, fn: Callable[[Conn], T]) -> T:
        """On the writer thread: ``fn`` in one ``BEGIN IMMEDIATE`` transaction, in this process's turn
        (``write_turns``: waiting for SQLite's lock by polling starves one of two busy writers)."""
        if self._turns is None:
            raise Unavailable("the ledger is not open")
        with self._turns:
            return self._in_txn(conn, "BEGIN IMMEDIATE", fn)

    @staticmethod
    def _in_txn(conn: Conn, begin: str, fn: Callable[[Conn], T]) -> T:
        try:
            conn.execute(begin)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                raise Unavailable(
                    f"the ledger database stayed locked for more than {BUSY_TIMEOUT_MS // 1000} s",
                    hint="Another process holds a long write transaction; retry shortly",
                ) from exc
            raise
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except _Rollback as rollback:
            conn.execute("ROLLBACK")
            return rollback.result  # type: ignore[return-value]
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def _write(self, fn: Callable[[Conn], T], *, durable: bool = True, batch: tuple[str, Any] | None = None) -> T:
        """Run ``fn`` atomically on the writer thread, durable when this returns.

        Group commit: operations that arrive while the writer is busy (its fsync) are run together
        in ONE ``BEGIN IMMEDIATE`` transaction, each inside its own SAVEPOINT, so one operation's
        failure or rollback never touches the others, and one fsync makes the whole group durable.
        Every caller is answered only after that COMMIT; a ``durable`` write (the default: captures,
        top-ups, refunds, payouts) only once the WAL is also fsynced. The fsync runs on a syncer
        thread, not the writer: the writer commits the next group (e.g. the next call's hold) while
        the previous group's frames are being synced, and one fsync covers every commit before it.
        That is ``synchronous=FULL``'s guarantee (a write is on disk before its caller hears of it)
        without its serialisation. ``durable=False`` writes (holds, voids, lease renewals: a crash
        that loses them voids the call anyway) are answered at COMMIT, visible to every process.

        ``batch`` = (kind, argument) marks a hold or capture: a run of those queued together is done
        by ``sqlite_batch`` in a fixed number of statements (``fn`` is its one-at-a-time fallback)."""
        if self._writer is None or self._wconn is None:
            raise Unavailable("the ledger is not open")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        with self._queue_lock:
            self._pending_writes.append((fn, future, loop, durable, batch))
            schedule = not self._flush_scheduled
            self._flush_scheduled = True
        if schedule:
            self._writer.submit(self._flush_writes, self._wconn)
        result: T = await future
        return result

    def _flush_writes(self, conn: Conn) -> None:
        """On the writer thread: commit queued writes, a group per transaction, until none are left."""
        while True:
            with self._queue_lock:
                if not self._pending_writes:
                    self._flush_scheduled = False
                    return
                count = min(len(self._pending_writes), _MAX_GROUP)
                batch = [self._pending_writes.popleft() for _ in range(count)]
            self._commit_group(conn, batch)

    def _commit_group(self, conn: Conn, batch: list[_Pending]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        committed = False
        try:
            self._write_txn(conn, lambda c: self._run_group(c, batch, outcomes))
            committed = True
        except BaseException as exc:  # noqa: BLE001 - the group failed to commit: every caller learns it
            outcomes = [(False, exc)] * len(batch)
        now: list[_Settled] = []
        after_sync: list[_Settled] = []
        for (_, future, loop, durable, _), (ok, value) in zip(batch, outcomes, strict=True):
            (after_sync if committed and durable else now).append((loop, future, ok, value))
        _settle_all(now)
        if after_sync:
            with self._sync_lock:
                self._sync_waiting.extend(after_sync)
                schedule = not self._sync_scheduled
                self._sync_scheduled = True
            if schedule and self._syncer is not None:
                self._syncer.submit(self._sync_writes)
            elif schedule:  # closed under us (not in the open/close order): fail, never hang
                with self._sync_lock:
                    waiting, self._sync_waiting, self._sync_scheduled = self._sync_waiting, [], False
                gone = Unavailable("the ledger was closed before its writes were made durable")
                _settle_all([(loop, future, False, gone) for loop, future, _, _ in waiting])

    def _sync_writes(self) -> None:
        """On the syncer thread: fsync the WAL, then answer everyone whose commit it covers."""
        while True:
            with self._sync_lock:
                if not self._sync_waiting:
                    self._sync_scheduled = False
                    return
                waiting, self._sync_waiting = self._sync_waiting, []
            try:
                if self._fsync_failed is not None:
                    raise OSError(0, self._fsync_failed)
                self._fsync_wal()
            except OSError as exc:
                # Linux may drop the pages of a failed fsync, so a later fsync that succeeds proves
                # nothing: from the first failure on, no durable write is confirmed again.
                self._fsync_failed = self._fsync_failed or exc.strerror or str(exc)
                failure = Unavailable(
                    f"the ledger could not make its writes durable (fsync of the WAL failed: {self._fsync_failed})",
                    hint="Check the disk under the ledger file and restart the gateway; "
                    "the write may or may not have been kept",
                )
                waiting = [(loop, future, False, failure) for loop, future, _, _ in waiting]
            _settle_all(waiting)

    def _fsync_wal(self) -> None:
        """fsync the WAL file: every frame committed before this call is on disk after it. The
        writer's connection keeps the WAL file alive; the inode check covers a WAL recreated by
        another process after ours was checkpointed away."""
        wal = f"{self.path}-wal"
        try:
            inode = os.stat(wal).st_ino
        except FileNotFoundError:
            return  # no WAL: everything was checkpointed into the database file, which SQLite synced
        if self._wal_fd is None or os.fstat(self._wal_fd).st_ino != inode:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            self._wal_fd = os.open(wal, os.O_RDONLY)
            directory = os.open(self.path.parent, os.O_RDONLY)  # a new WAL's directory entry, too
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        os.fsync(self._wal_fd)

    def _run_group(self, conn: Conn, batch: Sequence[_Pending], outcomes: list[tuple[bool, Any]]) -> None:
        """Run each queued write in order, except that a stretch of holds and captures between two
        other writes runs as one vector of captures, then one vector of holds. They were concurrent,
        so any order is one the callers could have seen; captures first only frees money earlier."""
        results: list[tuple[bool, Any] | None] = [None] * len(batch)
        i = 0
        while i < len(batch):
            if batch[i][4] is None:
                results[i] = self._run_one(conn, batch[i][0])
                i += 1
                continue
            j = i
            while j < len(batch) and batch[j][4] is not None:
                j += 1
            for kind in ("capture", "hold"):
                run = [n for n in range(i, j) if (marked := batch[n][4]) is not None and marked[0] == kind]
                for n, outcome in zip(run, self._run_vector(conn, kind, [batch[n] for n in run]), strict=True):
                    results[n] = outcome
            i = j
        assert all(r is not None for r in results), "every queued write has an outcome"
        outcomes.extend(r for r in results if r is not None)

    def _run_vector(self, conn: Conn, kind: str, run: Sequence[_Pending]) -> list[tuple[bool, Any]]:
        """A run of holds or captures in one go; on any database error, one at a time instead."""
        if len(run) < 2:
            return [self._run_one(conn, item[0]) for item in run]
        args = [marked[1] for item in run if (marked := item[4]) is not None]
        conn.execute("SAVEPOINT run")
        try:
            if kind == "hold":
                results = sqlite_batch.hold_many(conn, args, self._clock())
            else:
                results = sqlite_batch.capture_many(
                    conn, args, self._clock(), self._system[AccountKind.PLATFORM_FEE], self._charge_by_id
                )
        except sqlite3.Error:
            conn.execute("ROLLBACK TO run")
            conn.execute("RELEASE run")
            return [self._run_one(conn, item[0]) for item in run]
        conn.execute("RELEASE run")
        return results

    @staticmethod
    def _run_one(conn: Conn, fn: Callable[[Conn], Any]) -> tuple[bool, Any]:
        conn.execute("SAVEPOINT op")
        try:
            outcome: tuple[bool, Any] = (True, fn(conn))
        except _Rollback as rollback:
            conn.execute("ROLLBACK TO op")
            outcome = (True, rollback.result)
        except Exception as exc:  # noqa: BLE001 - reported to this operation's caller only
            conn.execute("ROLLBACK TO op")
            outcome = (False, exc)
        conn.execute("RELEASE op")
        return outcome

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        """Run ``fn`` in one read transaction (one consistent snapshot) on the reader thread."""
        if self._reader is None or self._rconn is None:
            raise Unavailable("the ledger is not open")
        conn = self._rconn
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._reader, self._in_txn, conn, "BEGIN", fn)
        except sqlite3.Error as exc:
            raise _storage_error(exc) from exc

    # --- helpers (run inside a transaction) -----------------------------------------------------
    @staticmethod
    def _account_id(conn: Conn, kind: AccountKind, name: str) -> int:
        row = conn.execute("SELECT id FROM accounts WHERE kind = ? AND name = ?", (kind.value, name)).fetchone()
        if row is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return int(row[0])

    @staticmethod
    def _available(conn: Conn, account_id: int) -> int:
        return int(conn.execute("SELECT balance - held FROM accounts WHERE id = ?", (account_id,)).fetchone()[0])

    @staticmethod
    def _spend_remaining(conn: Conn, key_id: str | None) -> int | None:
        if key_id is None:
            return None
        row = conn.execute("SELECT spend_limit - spent - held FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @staticmethod
    def _post(conn: Conn, transfer_id: str, legs: Sequence[tuple[int, int]], *, balancing: int = 0) -> None:
        """Write balanced postings and apply them to balances. A leg that would take a
        non-world account's available balance below zero raises ``_WouldGoNegative``; one that would
        take any balance outside +-MAX_BALANCE raises BalanceLimitExceeded (the caller's savepoint or
        transaction then rolls back every leg already applied).
        ``balancing``: the sum of legs of this transfer the caller has already written itself."""
        legs = [(account, amount) for account, amount in legs if amount != 0]
        if balancing + sum(amount for _, amount in legs) != 0:
            raise AssertionError(f"unbalanced transfer {transfer_id}: {legs}")
        for account, amount in legs:
            conn.execute(
                "INSERT INTO postings (transfer_id, account_id, amount) VALUES (?, ?, ?)",
                (transfer_id, account, amount),
            )
            # Checked arithmetic: a leg is at most MAX_AMOUNT and a balance within +-MAX_BALANCE, so the
            # sum cannot overflow SQLite's 64-bit integers (which would make it a REAL).
            updated = conn.execute(
                "UPDATE accounts SET balance = balance + ? "
                "WHERE id = ? AND (kind = 'world' OR balance - held + ? >= 0) AND balance + ? BETWEEN ? AND ?",
                (amount, account, amount, amount, -MAX_BALANCE, MAX_BALANCE),
            ).rowcount
            if updated != 1:
                row = conn.execute("SELECT kind, name, balance FROM accounts WHERE id = ?", (account,)).fetchone()
                if row is not None and not within_balance_limit(int(row[2]) + amount):
                    raise balance_limit_error(row[0], row[1], int(row[2]), amount)
                raise _WouldGoNegative(account)

    def _charge_by_id(self, conn: Conn, charge_id: str) -> Charge:
        row = conn.execute(f"SELECT {_CHARGE_COLUMNS} WHERE c.id = ?", (charge_id,)).fetchone()
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        return _charge(row)

    @staticmethod
    def _key_by_id(conn: Conn, key_id: str) -> KeyRecord:
        row = conn.execute(f"SELECT {_KEY_COLUMNS} WHERE k.id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _key_record(row)

    @staticmethod
    def _account_row(conn: Conn, kind: AccountKind, name: str) -> Account:
        row = conn.execute(
            "SELECT id, kind, name, balance, held FROM accounts WHERE kind = ? AND name = ?",
            (kind.value, name),
        ).fetchone()
        if row is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return Account(id=row[0], kind=AccountKind(row[1]), name=row[2], balance=row[3], held=row[4])

    # --- accounts -------------------------------------------------------------------------------
    async def create_user(self, name: str) -> Account:
        return await self._create_account(AccountKind.USER, name)

    async def create_developer(self, name: str) -> Account:
        return await self._create_account(AccountKind.DEVELOPER, name)

    async def _create_account(self, kind: AccountKind, name: str) -> Account:
        _require_name(name, f"{kind.value} name")

        def tx(conn: Conn) -> Account:
            inserted = conn.execute(
                "INSERT INTO accounts (kind, name, created_at) VALUES (?, ?, ?) ON CONFLICT (kind, name) DO NOTHING",
                (kind.value, name, self._clock()),
            ).rowcount
            if inserted != 1:
                raise AlreadyExists(f"{kind.value} {name!r} already exists")
            return self._account_row(conn, kind, name)

        return await self._write(tx)

    async def get_account(self, kind: AccountKind, name: str) -> Account:
        return await self._read(lambda conn: self._account_row(conn, kind, name))

    async def developer_names(self) -> set[str]:
        def tx(conn: Conn) -> set[str]:
            rows = conn.execute("SELECT name FROM accounts WHERE kind = 'developer'").fetchall()
            return {row[0] for row in rows}

        return await self._read(tx)

    async def topup(self, user: str, amount: int, reference: str | None = None) -> Transfer:
        _require_amount(amount)

        def tx(conn: Conn) -> Transfer:
            user_id = self._account_id(conn, AccountKind.USER, user)
            if reference is not None:
                row = conn.execute(
                    "SELECT id, amount, account_id, created_at FROM transfers WHERE kind = 'topup' AND reference = ?",
                    (reference,),
                ).fetchone()
                if row is not None:
                    if row[1] != amount or row[2] != user_id:
                        raise IdempotencyConflict(
                            f"top-up reference {reference!r} was already used for a different user or amount"
                        )
                    return Transfer(row[0], "topup", row[1], reference, row[3], replayed=True)
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            conn.execute(
                "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
                "VALUES (?, 'topup', ?, ?, ?, ?)",
                (transfer_id, amount, reference, user_id, now),
            )
            self._post(conn, transfer_id, [(self._system[AccountKind.WORLD], -amount), (user_id, amount)])
            return Transfer(transfer_id, "topup", amount, reference, now)

        return await self._write(tx)

    # --- keys -----------------------------------------------------------------------------------
    async def create_key(
        self,
        *,
        user: str,
        server: str,
        key_hash: str,
        prefix: str,
        expires_at: float | None,
        spend_limit: int | None,
    ) -> KeyRecord:
        _require_name(server, "server")
        _require_name(key_hash, "key hash")
        if spend_limit is not None and (
            not isinstance(spend_limit, int) or isinstance(spend_limit, bool) or spend_limit < 0
        ):
            raise InvalidInput(f"spend limit must be a non-negative number of millicents, got {spend_limit!r}")

        def tx(conn: Conn) -> KeyRecord:
            user_id = self._account_id(conn, AccountKind.USER, user)
            if conn.execute("SELECT 1 FROM keys WHERE key_hash = ?", (key_hash,)).fetchone():
                raise AlreadyExists("a key with this secret already exists")
            key_id = "key_" + secrets.token_hex(6)
            conn.execute(
                "INSERT INTO keys (id, user_account_id, server, key_hash, prefix, created_at, "
                "expires_at, spend_limit) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, user_id, server, key_hash, prefix, self._clock(), expires_at, spend_limit),
            )
            return self._key_by_id(conn, key_id)

        return await self._write(tx)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        def tx(conn: Conn) -> KeyRecord | None:
            row = conn.execute(f"SELECT {_KEY_COLUMNS} WHERE k.key_hash = ?", (key_hash,)).fetchone()
            return None if row is None else _key_record(row)

        return await self._read(tx)

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]:
        def tx(conn: Conn) -> list[KeyRecord]:
            if user is None:
                rows = conn.execute(f"SELECT {_KEY_COLUMNS} ORDER BY k.created_at, k.id").fetchall()
            else:
                user_id = self._account_id(conn, AccountKind.USER, user)
                rows = conn.execute(
                    f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = ? ORDER BY k.created_at, k.id",
                    (user_id,),
                ).fetchall()
            return [_key_record(row) for row in rows]

        return await self._read(tx)

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the key id or the start of its prefix")

        def tx(conn: Conn) -> KeyRecord:
            key_id = _resolve_id_or_prefix(conn, "keys", "key", id_or_prefix)
            conn.execute(
                "UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (self._clock(), key_id),
            )
            return self._key_by_id(conn, key_id)

        return await self._write(tx)

    async def revoked_since(self, since: float) -> list[str]:
        def tx(conn: Conn) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM keys WHERE revoked_at >= ? ORDER BY revoked_at, id", (since,)
            ).fetchall()
            return [row[0] for row in rows]

        return await self._read(tx)

    # --- two-phase money movement ---------------------------------------------------------------
    @staticmethod
    def _check_hold_request(req: HoldRequest) -> None:
        _require_amount(req.amount)
        if not isinstance(req.fee, int) or isinstance(req.fee, bool) or not 0 <= req.fee <= req.amount:
            raise InvalidInput(f"fee must be between 0 and the amount ({req.amount}), got {req.fee!r}")
        if not req.call_id:
            raise InvalidInput("a hold needs a call id")
        if not req.lease_s > 0:
            raise InvalidInput(f"lease must be positive, got {req.lease_s!r}")

    @staticmethod
    def _replayed_hold(conn: Conn, req: HoldRequest, user_id: int, developer_id: int) -> tuple[str, str | None] | None:
        """The (state, charge_id) of the hold already stored under ``req.call_id``, or None.
        Raises IdempotencyConflict when that hold was made for a different call."""
        row = conn.execute(
            "SELECT user_account_id, developer_account_id, server, name, amount, state, charge_id "
            "FROM holds WHERE call_id = ?",
            (req.call_id,),
        ).fetchone()
        if row is None:
            return None
        if tuple(row[:5]) != (user_id, developer_id, req.server, req.name, req.amount):
            raise IdempotencyConflict(
                f"call id {req.call_id!r} was already used for a different user, developer, server, name or amount"
            )
        return str(row[5]), row[6]

    async def hold(self, req: HoldRequest) -> HoldOutcome:
        self._check_hold_request(req)
        return await self._write(lambda conn: self._tx_hold(conn, req), durable=False, batch=("hold", req))

    def _tx_hold(self, conn: Conn, req: HoldRequest) -> HoldOutcome:
        # the user, the developer and the key's owner in one statement (the checks in this order)
        user_id, developer_id, key_owner = conn.execute(
            "SELECT (SELECT id FROM accounts WHERE kind = 'user' AND name = ?), "
            "(SELECT id FROM accounts WHERE kind = 'developer' AND name = ?), "
            "(SELECT user_account_id FROM keys WHERE id = ?)",
            (req.user, req.developer, req.key_id),
        ).fetchone()
        if user_id is None:
            raise NotFound(f"no user named {req.user!r}")
        if developer_id is None:
            raise NotFound(f"no developer named {req.developer!r}")
        if req.key_id is not None:
            if key_owner is None:
                raise NotFound(f"no key {req.key_id!r}")
            if key_owner != user_id:
                raise InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")
        now = self._clock()
        inserted = conn.execute(
            f"INSERT INTO holds ({HOLD_INSERT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (call_id) DO NOTHING",
            hold_row(req, user_id, developer_id, now),
        ).rowcount
        if inserted != 1:
            self._replayed_hold(conn, req, user_id, developer_id)
            return HoldOutcome(
                HoldStatus.REPLAYED,
                available=self._available(conn, user_id),
                spend_remaining=self._spend_remaining(conn, req.key_id),
            )
        rows = conn.execute(
            "UPDATE accounts SET held = held + ? WHERE id = ? AND balance - held >= ? RETURNING balance - held",
            (req.amount, user_id, req.amount),
        ).fetchall()
        if not rows:
            raise _Rollback(
                HoldOutcome(
                    HoldStatus.INSUFFICIENT_FUNDS,
                    available=self._available(conn, user_id),
                    spend_remaining=self._spend_remaining(conn, req.key_id),
                )
            )
        available = int(rows[0][0])
        spend_remaining: int | None = None
        if req.key_id is not None:
            rows = conn.execute(
                "UPDATE keys SET held = held + ? WHERE id = ? "
                "AND (spend_limit IS NULL OR spent + held + ? <= spend_limit) "
                "RETURNING spend_limit - spent - held",
                (req.amount, req.key_id, req.amount),
            ).fetchall()
            if not rows:
                raise _Rollback(
                    HoldOutcome(
                        HoldStatus.SPEND_LIMIT,
                        available=available + req.amount,
                        spend_remaining=self._spend_remaining(conn, req.key_id),
                    )
                )
            spend_remaining = None if rows[0][0] is None else int(rows[0][0])
        return HoldOutcome(HoldStatus.OK, available=available, spend_remaining=spend_remaining)

    async def capture(self, call_id: str, amount: int | None = None) -> Charge:
        if amount is not None:
            _require_amount(amount, "capture amount")
        return await self._write(
            lambda conn: self._tx_capture(conn, call_id, amount), batch=("capture", (call_id, amount))
        )

    def _tx_capture(self, conn: Conn, call_id: str, amount: int | None) -> Charge:
        row = conn.execute(
            "SELECT h.key_id, h.user_account_id, h.developer_account_id, h.amount, h.fee, h.state, h.charge_id, "
            "h.server, h.method, h.name, u.name, d.name FROM holds h "
            "JOIN accounts u ON u.id = h.user_account_id JOIN accounts d ON d.id = h.developer_account_id "
            "WHERE h.call_id = ?",
            (call_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no hold for call {call_id!r}")
        key_id, user_id, developer_id, held, hold_fee, state, charge_id, server, method, name, user, developer = row
        if state == HoldState.CAPTURED:
            return replace(self._charge_by_id(conn, charge_id), replayed=True)
        if state == HoldState.VOIDED:
            raise Conflict(f"the hold for call {call_id!r} was voided; it cannot be captured")
        if amount is None:
            amount = int(held)
        if amount > held:
            raise InvalidInput(
                f"cannot capture {format_cents(amount)} cents: the hold for call {call_id!r} "
                f"reserved only {format_cents(held)}"
            )
        fee = hold_fee * amount // held
        now = self._clock()
        charge_id = charge_id_for(call_id)
        conn.execute(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
            "VALUES (?, 'charge', ?, ?, ?, ?)",
            (charge_id, amount, call_id, user_id, now),
        )
        updated = conn.execute(
            "UPDATE holds SET state = 'captured', charge_id = ?, settled_at = ? "
            "WHERE call_id = ? AND state = 'pending'",
            (charge_id, now, call_id),
        ).rowcount
        if updated != 1:
            raise Conflict(f"the hold for call {call_id!r} is no longer pending")
        if key_id is not None:
            conn.execute("UPDATE keys SET held = held - ?, spent = spent + ? WHERE id = ?", (held, amount, key_id))
        # The user's leg and the release of the hold in one update: what was held is no longer held,
        # and the amount captured (at most that) leaves the balance, so the available balance cannot
        # fall (the CHECK on accounts still guards it). The other legs go through _post's guard.
        conn.execute(
            "INSERT INTO postings (transfer_id, account_id, amount) VALUES (?, ?, ?)", (charge_id, user_id, -amount)
        )
        balance_after = int(
            conn.execute(
                "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ? RETURNING balance - held",
                (amount, held, user_id),
            ).fetchone()[0]
        )
        self._post(
            conn,
            charge_id,
            [(developer_id, amount - fee), (self._system[AccountKind.PLATFORM_FEE], fee)],
            balancing=-amount,
        )
        conn.execute(
            "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, "
            "balance_after, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (charge_id, call_id, user_id, developer_id, amount, fee, balance_after, now),
        )
        return Charge.captured(
            call_id,
            user=user,
            developer=developer,
            server=server,
            method=method,
            name=name,
            amount=amount,
            fee=fee,
            now=now,
            balance_after=balance_after,
        )

    async def void(self, call_id: str) -> bool:
        """Release a pending hold. False when it was not pending, or no such hold exists (a hold
        that was refused leaves no row, and voiding it is harmless)."""

        def tx(conn: Conn) -> bool:
            rows = conn.execute(
                "UPDATE holds SET state = 'voided', settled_at = ? WHERE call_id = ? AND state = 'pending' "
                "RETURNING user_account_id, key_id, amount",
                (self._clock(), call_id),
            ).fetchall()
            self._release(conn, rows)
            return bool(rows)

        return await self._write(tx, durable=False)

    @staticmethod
    def _release(conn: Conn, voided: Sequence[Sequence[Any]]) -> None:
        """Give back what voided holds (rows of user_account_id, key_id, amount) reserved."""
        by_account: dict[int, int] = defaultdict(int)
        by_key: dict[str, int] = defaultdict(int)
        for user_id, key_id, amount in voided:
            by_account[user_id] += amount
            if key_id is not None:
                by_key[key_id] += amount
        conn.executemany(
            "UPDATE accounts SET held = held - ? WHERE id = ?",
            [(amount, account) for account, amount in by_account.items()],
        )
        conn.executemany(
            "UPDATE keys SET held = held - ? WHERE id = ?", [(amount, key) for key, amount in by_key.items()]
        )

    async def renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        if not call_ids:
            return

        def tx(conn: Conn) -> None:
            expires = self._clock() + lease_s
            conn.executemany(
                "UPDATE holds SET lease_expires_at = ? WHERE call_id = ? AND state = 'pending'",
                [(expires, call_id) for call_id in call_ids],
            )

        await self._write(tx, durable=False)

    async def sweep(self, now: float | None = None) -> int:
        def tx(conn: Conn) -> int:
            at = self._clock() if now is None else now
            rows = conn.execute(
                "UPDATE holds SET state = 'voided', settled_at = ? "
                "WHERE state = 'pending' AND lease_expires_at < ? "
                "RETURNING user_account_id, key_id, amount",
                (at, at),
            ).fetchall()
            self._release(conn, rows)
            return len(rows)

        return await self._write(tx)

    async def get_hold(self, call_id: str) -> HoldInfo:
        def tx(conn: Conn) -> HoldInfo:
            row = conn.execute(f"SELECT {_HOLD_COLUMNS} WHERE h.call_id = ?", (call_id,)).fetchone()
            if row is None:
                raise NotFound(f"no hold for call {call_id!r}")
            return _hold_info(row)

        return await self._read(tx)

    async def charge(self, req: HoldRequest) -> ChargeResult:
        """Hold and capture in one transaction: either the whole charge is written or nothing."""
        self._check_hold_request(req)
        return await self._write(lambda conn: self._tx_charge(conn, req))

    def _tx_charge(self, conn: Conn, req: HoldRequest) -> ChargeResult:
        user_id = self._account_id(conn, AccountKind.USER, req.user)
        developer_id = self._account_id(conn, AccountKind.DEVELOPER, req.developer)
        prior = self._replayed_hold(conn, req, user_id, developer_id)
        if prior is not None:
            state, charge_id = prior
            if state == HoldState.CAPTURED and charge_id is not None:
                return ChargeResult(
                    HoldStatus.REPLAYED,
                    available=self._available(conn, user_id),
                    charge=self._charge_by_id(conn, charge_id),
                    spend_remaining=self._spend_remaining(conn, req.key_id),
                )
            if state == HoldState.VOIDED:
                raise Conflict(f"call {req.call_id!r} was voided; it cannot be charged")
            raise Conflict(f"call {req.call_id!r} has a pending hold; capture or release it instead of charging again")
        try:
            outcome = self._tx_hold(conn, req)
        except _Rollback as refused:
            assert isinstance(refused.result, HoldOutcome)
            raise _Rollback(
                ChargeResult(
                    refused.result.status,
                    available=refused.result.available,
                    spend_remaining=refused.result.spend_remaining,
                )
            ) from None
        if outcome.status is not HoldStatus.OK:  # a replay was ruled out above, under the same lock
            raise Conflict(f"call {req.call_id!r} could not be held ({outcome.status.value})")
        charge = self._tx_capture(conn, req.call_id, None)
        return ChargeResult(
            HoldStatus.OK,
            available=charge.balance_after,
            charge=charge,
            spend_remaining=self._spend_remaining(conn, req.key_id),
        )

    # --- refunds --------------------------------------------------------------------------------
    async def refund(self, charge_id: str, amount: int | None = None, reference: str | None = None) -> Transfer:
        """Reverse all or part of a charge: developer -share, platform_fee -fee share, user +amount.

        ``amount`` defaults to what remains refundable. Cumulative refunds never exceed the charge
        (Conflict). A repeated non-None ``reference`` returns the original refund with
        ``replayed=True``; the same reference for another charge or amount raises
        IdempotencyConflict. Raises Conflict when the developer's unpaid earnings cannot cover it.
        """
        if amount is not None:
            _require_amount(amount, "refund amount")
        return await self._write(lambda conn: self._tx_refund(conn, charge_id, amount, reference))

    def _tx_refund(self, conn: Conn, charge_id: str, amount: int | None, reference: str | None) -> Transfer:
        row = conn.execute(
            "SELECT c.amount, c.fee, c.refunded, c.user_account_id, c.developer_account_id, h.key_id "
            "FROM charges c JOIN holds h ON h.call_id = c.call_id WHERE c.id = ?",
            (charge_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        charged, fee, refunded, user_id, developer_id, key_id = row
        if reference is not None:
            prior = conn.execute(
                "SELECT id, amount, charge_id, created_at FROM transfers WHERE kind = 'refund' AND reference = ?",
                (reference,),
            ).fetchone()
            if prior is not None:
                if prior[2] != charge_id or (amount is not None and amount != prior[1]):
                    raise IdempotencyConflict(
                        f"refund reference {reference!r} was already used for a different charge or amount"
                    )
                return Transfer(prior[0], "refund", prior[1], reference, prior[3], replayed=True)
        if amount is None:
            amount = charged - refunded
            if amount == 0:
                raise Conflict(f"charge {charge_id} is already fully refunded")
        rows = conn.execute(
            "UPDATE charges SET refunded = refunded + ? WHERE id = ? AND refunded + ? <= amount RETURNING refunded",
            (amount, charge_id, amount),
        ).fetchall()
        if not rows:
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: only "
                f"{format_cents(charged - refunded)} of its {format_cents(charged)} cents remain refundable"
            )
        after = int(rows[0][0])
        before = after - amount
        # Fee shares computed cumulatively, so partial refunds add up to exactly the fee.
        fee_share = fee * after // charged - fee * before // charged
        now = self._clock()
        transfer_id = "tr_" + uuid.uuid4().hex
        conn.execute(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, charge_id, created_at) "
            "VALUES (?, 'refund', ?, ?, ?, ?, ?)",
            (transfer_id, amount, reference, user_id, charge_id, now),
        )
        try:
            self._post(
                conn,
                transfer_id,
                [
                    (developer_id, -(amount - fee_share)),
                    (self._system[AccountKind.PLATFORM_FEE], -fee_share),
                    (user_id, amount),
                ],
            )
        except _WouldGoNegative as exc:
            kind, name, balance = conn.execute(
                "SELECT kind, name, balance FROM accounts WHERE id = ?", (exc.account_id,)
            ).fetchone()
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: the {kind} account "
                f"{name!r} holds only {format_cents(balance)} cents (earnings already paid out)",
                hint="Refund a smaller amount or settle it outside AgentPay",
            ) from None
        if key_id is not None:
            conn.execute("UPDATE keys SET spent = spent - ? WHERE id = ?", (amount, key_id))
        return Transfer(transfer_id, "refund", amount, reference, now)

    async def get_charge(self, charge_id: str) -> Charge:
        return await self._read(lambda conn: self._charge_by_id(conn, charge_id))

    async def list_charges(
        self,
        *,
        developer: str | None = None,
        user: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Charge]:
        """Newest first, ordered by (created_at, id) so the ``before`` cursor is stable. Raises
        NotFound for an unknown developer or user, InvalidInput for a cursor outside the list."""
        _require_limit(limit)

        def tx(conn: Conn) -> list[Charge]:
            developer_id = None if developer is None else self._account_id(conn, AccountKind.DEVELOPER, developer)
            user_id = None if user is None else self._account_id(conn, AccountKind.USER, user)
            where = "(?1 IS NULL OR c.developer_account_id = ?1) AND (?2 IS NULL OR c.user_account_id = ?2)"
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = conn.execute(
                    f"SELECT c.created_at, c.id FROM charges c WHERE {where} AND c.id = ?3",
                    (developer_id, user_id, before),
                ).fetchone()
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the id of the last charge of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} WHERE {where} AND (?3 IS NULL OR (c.created_at, c.id) < (?3, ?4)) "
                "ORDER BY c.created_at DESC, c.id DESC LIMIT ?5",
                (developer_id, user_id, cursor[0], cursor[1], limit),
            ).fetchall()
            return [_charge(row) for row in rows]

        return await self._read(tx)

    # --- service tokens -------------------------------------------------------------------------
    async def create_service_token(
        self, *, developer: str, servers: Sequence[str], token_hash: str, prefix: str
    ) -> ServiceToken:
        _require_name(token_hash, "token hash")
        _require_name(prefix, "token prefix")
        if isinstance(servers, str):
            raise InvalidInput("servers must be a list of server names, not one string")
        names = list(dict.fromkeys(_require_name(server, "server") for server in servers))
        if not names:
            raise InvalidInput("a service token needs at least one server")

        def tx(conn: Conn) -> ServiceToken:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            if conn.execute("SELECT 1 FROM service_tokens WHERE token_hash = ?", (token_hash,)).fetchone():
                raise AlreadyExists("a service token with this secret already exists")
            token_id = "tok_" + secrets.token_hex(6)
            conn.execute(
                "INSERT INTO service_tokens (id, developer_account_id, servers, token_hash, prefix, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, developer_id, json.dumps(names), token_hash, prefix, self._clock()),
            )
            return self._token_by_id(conn, token_id)

        return await self._write(tx)

    @staticmethod
    def _token_by_id(conn: Conn, token_id: str) -> ServiceToken:
        row = conn.execute(f"SELECT {_TOKEN_COLUMNS} WHERE t.id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"no service token {token_id!r}")
        return _service_token(row)

    async def find_service_token(self, token_hash: str) -> ServiceToken | None:
        def tx(conn: Conn) -> ServiceToken | None:
            row = conn.execute(f"SELECT {_TOKEN_COLUMNS} WHERE t.token_hash = ?", (token_hash,)).fetchone()
            return None if row is None else _service_token(row)

        return await self._read(tx)

    async def list_service_tokens(self, developer: str | None = None) -> list[ServiceToken]:
        def tx(conn: Conn) -> list[ServiceToken]:
            developer_id = None if developer is None else self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} WHERE ?1 IS NULL OR t.developer_account_id = ?1 ORDER BY t.created_at, t.id",
                (developer_id,),
            ).fetchall()
            return [_service_token(row) for row in rows]

        return await self._read(tx)

    async def revoke_service_token(self, id_or_prefix: str) -> ServiceToken:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the service token id or the start of its prefix")

        def tx(conn: Conn) -> ServiceToken:
            token_id = _resolve_id_or_prefix(conn, "service_tokens", "service token", id_or_prefix)
            conn.execute(
                "UPDATE service_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (self._clock(), token_id),
            )
            return self._token_by_id(conn, token_id)

        return await self._write(tx)

    # --- payouts --------------------------------------------------------------------------------
    @staticmethod
    def _payout_by_id(conn: Conn, payout_id: str) -> Payout:
        row = conn.execute(f"SELECT {_PAYOUT_COLUMNS} WHERE p.id = ?", (payout_id,)).fetchone()
        if row is None:
            raise NotFound(f"no payout {payout_id!r}")
        return _payout(row)

    async def create_payout(self, developer: str, amount: int | None = None) -> Payout:
        """developer -> payout_clearing, pending. The debit is the guarded ``UPDATE`` in ``_post``,
        so concurrent payouts (from any process) can never take the developer below zero."""
        if amount is not None:
            _require_amount(amount, "payout amount")

        def tx(conn: Conn) -> Payout:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            available = self._available(conn, developer_id)
            payout = available if amount is None else amount
            if payout <= 0:
                raise InvalidInput(f"developer {developer!r} has no earnings to pay out")
            payout_id = "po_" + uuid.uuid4().hex
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            conn.execute(
                "INSERT INTO payouts (id, developer_account_id, amount, created_at) VALUES (?, ?, ?, ?)",
                (payout_id, developer_id, payout, now),
            )
            conn.execute(
                "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
                "VALUES (?, 'payout', ?, ?, ?, ?)",
                (transfer_id, payout, payout_id, developer_id, now),
            )
            try:
                self._post(
                    conn,
                    transfer_id,
                    [(developer_id, -payout), (self._system[AccountKind.PAYOUT_CLEARING], payout)],
                )
            except _WouldGoNegative:
                raise Conflict(
                    f"cannot pay out {format_cents(payout)} cents: developer {developer!r} has only "
                    f"{format_cents(available)} cents of earnings",
                    hint="Pay out at most the available earnings, or give no amount to pay out all of them",
                ) from None
            return self._payout_by_id(conn, payout_id)

        return await self._write(tx)

    async def settle_payout(self, payout_id: str, reference: str) -> Payout:
        _require_name(reference, "payout reference")

        def tx(conn: Conn) -> Payout:
            developer_id, amount = self._final_payout_check(conn, payout_id, PayoutState.SETTLED, reference)
            if amount is None:
                return self._payout_by_id(conn, payout_id)
            self._complete_payout(
                conn,
                payout_id,
                PayoutState.SETTLED,
                reference,
                developer_id,
                [(self._system[AccountKind.PAYOUT_CLEARING], -amount), (self._system[AccountKind.WORLD], amount)],
            )
            return self._payout_by_id(conn, payout_id)

        return await self._write(tx)

    async def fail_payout(self, payout_id: str) -> Payout:
        def tx(conn: Conn) -> Payout:
            developer_id, amount = self._final_payout_check(conn, payout_id, PayoutState.FAILED, None)
            assert amount is not None  # only a settle with the same reference is a replay
            self._complete_payout(
                conn,
                payout_id,
                PayoutState.FAILED,
                None,
                developer_id,
                [(self._system[AccountKind.PAYOUT_CLEARING], -amount), (developer_id, amount)],
            )
            return self._payout_by_id(conn, payout_id)

        return await self._write(tx)

    @staticmethod
    def _final_payout_check(
        conn: Conn, payout_id: str, target: PayoutState, reference: str | None
    ) -> tuple[int, int | None]:
        """(developer account id, amount) of a pending payout; amount None when ``target`` is a
        replay (settled again with the same reference). Raises NotFound, or Conflict when the payout
        already reached another final state."""
        row = conn.execute(
            "SELECT developer_account_id, amount, state, reference FROM payouts WHERE id = ?", (payout_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no payout {payout_id!r}")
        developer_id, amount, state, prior = row
        if state == PayoutState.PENDING:
            return int(developer_id), int(amount)
        if state == PayoutState.SETTLED == target and prior == reference:
            return int(developer_id), None
        settled = f" with reference {prior!r}" if state == PayoutState.SETTLED else ""
        raise Conflict(
            f"payout {payout_id} is already {state}{settled}; it cannot be {target.value}",
            hint="A payout leaves 'pending' once: settle it or fail it, not both",
        )

    def _complete_payout(
        self,
        conn: Conn,
        payout_id: str,
        state: PayoutState,
        reference: str | None,
        developer_id: int,
        legs: Sequence[tuple[int, int]],
    ) -> None:
        now = self._clock()
        updated = conn.execute(
            "UPDATE payouts SET state = ?, reference = ?, completed_at = ? WHERE id = ? AND state = 'pending'",
            (state.value, reference, now, payout_id),
        ).rowcount
        if updated != 1:
            raise Conflict(f"payout {payout_id} is no longer pending")
        amount = sum(a for _, a in legs if a > 0)
        transfer_id = "tr_" + uuid.uuid4().hex
        kind = "payout_settle" if state == PayoutState.SETTLED else "payout_fail"
        conn.execute(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (transfer_id, kind, amount, payout_id, developer_id, now),
        )
        self._post(conn, transfer_id, legs)

    async def list_payouts(self, developer: str | None = None) -> list[Payout]:
        """Newest first."""

        def tx(conn: Conn) -> list[Payout]:
            developer_id = None if developer is None else self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = conn.execute(
                f"SELECT {_PAYOUT_COLUMNS} WHERE ?1 IS NULL OR p.developer_account_id = ?1 "
                "ORDER BY p.created_at DESC, p.id DESC",
                (developer_id,),
            ).fetchall()
            return [_payout(row) for row in rows]

        return await self._read(tx)

    async def statement(self, developer: str, *, limit: int = 100, before: str | None = None) -> list[StatementLine]:
        """Every posting on the developer's account (charges, refunds, payouts, failed payouts),
        newest first by (created_at, transfer id); ``before`` is the last transfer id of the
        previous page."""
        _require_limit(limit)

        def tx(conn: Conn) -> list[StatementLine]:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = conn.execute(
                    "SELECT t.created_at, t.id FROM transfers t WHERE t.id = ? AND EXISTS "
                    "(SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.account_id = ?)",
                    (before, developer_id),
                ).fetchone()
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the last transfer id of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = conn.execute(
                "SELECT t.id, t.kind, SUM(p.amount), h.server, h.name, t.charge_id, t.created_at "
                "FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "LEFT JOIN charges c ON c.id = CASE WHEN t.kind = 'charge' THEN t.id ELSE t.charge_id END "
                "LEFT JOIN holds h ON h.call_id = c.call_id "
                "WHERE p.account_id = ?1 AND (?2 IS NULL OR (t.created_at, t.id) < (?2, ?3)) "
                "GROUP BY t.id ORDER BY t.created_at DESC, t.id DESC LIMIT ?4",
                (developer_id, cursor[0], cursor[1], limit),
            ).fetchall()
            return [StatementLine(*row) for row in rows]

        return await self._read(tx)

    async def earnings_breakdown(self, developer: str) -> list[EarningsBreakdown]:
        """Per (server, name): captured charges and what they credited the developer, net of refunds."""

        def tx(conn: Conn) -> list[EarningsBreakdown]:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = conn.execute(
                "SELECT h.server, h.name, COUNT(*), COALESCE(SUM(m.amount), 0) "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id "
                "LEFT JOIN (SELECT CASE WHEN t.kind = 'charge' THEN t.id ELSE t.charge_id END AS charge_id, "
                "           SUM(p.amount) AS amount "
                "           FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "           WHERE p.account_id = ?1 AND t.kind IN ('charge', 'refund') GROUP BY 1) m "
                "ON m.charge_id = c.id "
                "WHERE c.developer_account_id = ?1 GROUP BY h.server, h.name ORDER BY h.server, h.name",
                (developer_id,),
            ).fetchall()
            return [EarningsBreakdown(developer, server, name, n, int(amount)) for server, name, n, amount in rows]

        return await self._read(tx)

    # --- reporting ------------------------------------------------------------------------------
    async def user_summary(self, user: str, recent: int = 10) -> UserSummary:
        def tx(conn: Conn) -> UserSummary:
            account = self._account_row(conn, AccountKind.USER, user)
            keys = conn.execute(
                f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = ? ORDER BY k.created_at, k.id",
                (account.id,),
            ).fetchall()
            charges = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} WHERE c.user_account_id = ? "
                "ORDER BY c.created_at DESC, c.rowid DESC LIMIT ?",
                (account.id, max(recent, 0)),
            ).fetchall()
            return UserSummary(
                user=user,
                balance=account.balance,
                held=account.held,
                available=account.available,
                keys=[_key_record(row) for row in keys],
                recent_charges=[_charge(row) for row in charges],
            )

        return await self._read(tx)

    async def usage(self, user: str | None = None, server: str | None = None) -> list[UsageRow]:
        def tx(conn: Conn) -> list[UsageRow]:
            rows = conn.execute(
                "SELECT u.name, h.server, h.method, h.name, COUNT(*), SUM(c.amount) "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id "
                "JOIN accounts u ON u.id = c.user_account_id "
                "WHERE (?1 IS NULL OR u.name = ?1) AND (?2 IS NULL OR h.server = ?2) "
                "GROUP BY u.name, h.server, h.method, h.name ORDER BY u.name, h.server, h.method, h.name",
                (user, server),
            ).fetchall()
            return [UsageRow(*row) for row in rows]

        return await self._read(tx)

    async def earnings(self, developer: str) -> Earnings:
        def tx(conn: Conn) -> Earnings:
            account = self._account_row(conn, AccountKind.DEVELOPER, developer)
            lifetime = conn.execute(
                "SELECT COALESCE(SUM(p.amount), 0) FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "WHERE p.account_id = ? AND t.kind IN ('charge', 'refund')",
                (account.id,),
            ).fetchone()[0]
            return Earnings(developer=developer, earnings=account.balance, lifetime=int(lifetime))

        return await self._read(tx)

    async def verify(self) -> list[str]:
        return await self._read(_verify)

    # --- maintenance: migrations, export / import -----------------------------------------------
    def _applied_on_disk(self) -> set[str]:
        """Migrations recorded in the file before this process opened it (none if there is no file)."""
        if not self.path.exists():
            return set()
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'")
            if found.fetchone():
                return {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
            return set()
        finally:
            conn.close()

    async def migrate(self) -> list[str]:
        before = set(await self.applied_migrations()) if self._wconn is not None else None
        if before is None:
            before = await asyncio.get_running_loop().run_in_executor(None, self._applied_on_disk)
            await self.open()
        after = set(await self.applied_migrations())
        return [name for name, _ in MIGRATIONS if name in after and name not in before]

    async def applied_migrations(self) -> list[str]:
        def tx(conn: Conn) -> list[str]:
            return [row[0] for row in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]

        return await self._read(tx)

    async def export_rows(self) -> list[ExportRow]:
        def tx(conn: Conn) -> list[ExportRow]:
            rows: list[ExportRow] = []
            for table in EXPORT_TABLES:
                names = [name for name, _ in EXPORT_COLUMNS[table]]
                for values in conn.execute(_EXPORT_QUERIES[table]):
                    row = dict(zip(names, values, strict=True))
                    if table == "service_tokens":
                        row["servers"] = json.loads(row["servers"])
                    rows.append((table, row))
            return rows

        return await self._read(tx)

    async def import_rows(self, rows: Iterable[ExportRow]) -> dict[str, int]:
        checked = [(table, check_row(table, row)) for table, row in rows]

        def tx(conn: Conn) -> tuple[dict[str, int], dict[AccountKind, int]]:
            in_use = conn.execute(
                "SELECT (SELECT COUNT(*) FROM accounts WHERE kind IN ('user', 'developer')), "
                "(SELECT COUNT(*) FROM transfers), (SELECT COUNT(*) FROM keys), (SELECT COUNT(*) FROM holds), "
                "(SELECT COUNT(*) FROM service_tokens), (SELECT COUNT(*) FROM payouts)"
            ).fetchone()
            if any(in_use):
                raise Conflict(
                    f"the target ledger {self.path} is not empty ({in_use[0]} users/developers, "
                    f"{in_use[1]} transfers); import only into a new, empty ledger",
                    hint="Point --into at a new database file",
                )
            conn.execute("DELETE FROM accounts")  # only the system accounts: the dump brings its own
            counts = dict.fromkeys(EXPORT_TABLES, 0)
            for number, (table, row) in enumerate(checked, start=1):
                values = dict(row)
                if table == "service_tokens":
                    values["servers"] = json.dumps(values["servers"])
                if table == "payouts":
                    del values["transfer_id"]  # SQLite finds a payout's transfer by its reference
                names = list(values)
                try:
                    conn.execute(
                        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [values[name] for name in names],
                    )
                except sqlite3.IntegrityError as exc:
                    first = next(iter(row.values()))
                    raise InvalidInput(f"row {number} ({table} {first!r}) of the dump does not fit: {exc}") from None
                counts[table] += 1
            return counts, self._tx_system_accounts(conn)  # a dump without them still gets them

        counts, self._system = await self._write(tx)
        return counts


def _verify(conn: Conn) -> list[str]:
    """Every invariant, checked inside the caller's single read transaction."""
    problems: list[str] = []

    def q(sql: str) -> list[Any]:
        return conn.execute(sql).fetchall()

    total = q("SELECT COALESCE(SUM(amount), 0) FROM postings")[0][0]
    if total != 0:
        problems.append(f"postings sum to {total}, not 0")
    for transfer_id, s in q(
        "SELECT transfer_id, SUM(amount) FROM postings GROUP BY transfer_id HAVING SUM(amount) <> 0"
    ):
        problems.append(f"transfer {transfer_id}: postings sum to {s}, not 0")
    for transfer_id, kind, amount, credits in q(
        "SELECT t.id, t.kind, t.amount, COALESCE(SUM(CASE WHEN p.amount > 0 THEN p.amount END), 0) "
        "FROM transfers t LEFT JOIN postings p ON p.transfer_id = t.id GROUP BY t.id "
        "HAVING COALESCE(SUM(CASE WHEN p.amount > 0 THEN p.amount END), 0) <> t.amount"
    ):
        problems.append(f"{kind} transfer {transfer_id}: amount {amount} but its credits sum to {credits}")
    for kind, name, balance, s in q(
        "SELECT a.kind, a.name, a.balance, COALESCE(p.s, 0) FROM accounts a "
        "LEFT JOIN (SELECT account_id, SUM(amount) AS s FROM postings GROUP BY account_id) p "
        "ON p.account_id = a.id WHERE a.balance <> COALESCE(p.s, 0)"
    ):
        problems.append(f"{kind} {name!r}: balance {balance} but its postings sum to {s}")
    for kind, name, held, s in q(
        "SELECT a.kind, a.name, a.held, COALESCE(h.s, 0) FROM accounts a "
        "LEFT JOIN (SELECT user_account_id, SUM(amount) AS s FROM holds WHERE state = 'pending' "
        "GROUP BY user_account_id) h ON h.user_account_id = a.id WHERE a.held <> COALESCE(h.s, 0)"
    ):
        problems.append(f"{kind} {name!r}: held {held} but its pending holds sum to {s}")
    for key_id, held, s in q(
        "SELECT k.id, k.held, COALESCE(h.s, 0) FROM keys k "
        "LEFT JOIN (SELECT key_id, SUM(amount) AS s FROM holds WHERE state = 'pending' GROUP BY key_id) h "
        "ON h.key_id = k.id WHERE k.held <> COALESCE(h.s, 0)"
    ):
        problems.append(f"key {key_id}: held {held} but its pending holds sum to {s}")
    for key_id, spent, s in q(
        "SELECT k.id, k.spent, COALESCE(c.s, 0) FROM keys k "
        "LEFT JOIN (SELECT h.key_id, SUM(c.amount - c.refunded) AS s FROM charges c "
        "JOIN holds h ON h.call_id = c.call_id GROUP BY h.key_id) c "
        "ON c.key_id = k.id WHERE k.spent <> COALESCE(c.s, 0)"
    ):
        problems.append(f"key {key_id}: spent {spent} but its charges net of refunds sum to {s}")
    for name, balance, held in q(
        "SELECT name, balance, held FROM accounts WHERE kind = 'user' AND (balance - held < 0 OR held < 0)"
    ):
        problems.append(f"user {name!r}: balance {balance} with {held} held leaves a negative available")
    for kind, name, held in q("SELECT kind, name, held FROM accounts WHERE held < 0 AND kind <> 'user'"):
        problems.append(f"{kind} {name!r}: negative held {held}")
    for kind, name, balance, stored in q(
        "SELECT kind, name, balance, typeof(balance) FROM accounts "
        f"WHERE typeof(balance) <> 'integer' OR balance > {MAX_BALANCE} OR balance < {-MAX_BALANCE}"
    ):
        problems.append(f"{kind} {name!r}: balance {balance!r} ({stored}) is not an integer within +-{MAX_BALANCE}")
    for kind, name, balance in q(
        "SELECT kind, name, balance FROM accounts "
        "WHERE kind IN ('developer', 'platform_fee', 'payout_clearing') AND balance < 0"
    ):
        problems.append(f"{kind} {name!r}: negative balance {balance}")
    for call_id, charge_id, hold_amount, charge_amount, transfer_kind, user_posting in q(
        "SELECT h.call_id, h.charge_id, h.amount, c.amount, t.kind, "
        "(SELECT SUM(p.amount) FROM postings p "
        " WHERE p.transfer_id = h.charge_id AND p.account_id = h.user_account_id) "
        "FROM holds h LEFT JOIN charges c ON c.id = h.charge_id LEFT JOIN transfers t ON t.id = h.charge_id "
        "WHERE h.state = 'captured'"
    ):
        if charge_id is None or charge_amount is None or transfer_kind != "charge":
            problems.append(f"captured hold {call_id}: no charge transfer")
        elif user_posting != -charge_amount:
            problems.append(
                f"captured hold {call_id}: charge {charge_id} debits the user {user_posting}, not {-charge_amount}"
            )
        elif charge_amount > hold_amount:
            problems.append(f"captured hold {call_id}: charged {charge_amount}, more than held {hold_amount}")
    for charge_id, refunded, s in q(
        "SELECT c.id, c.refunded, COALESCE(r.s, 0) FROM charges c "
        "LEFT JOIN (SELECT charge_id, SUM(amount) AS s FROM transfers WHERE kind = 'refund' "
        "GROUP BY charge_id) r ON r.charge_id = c.id WHERE c.refunded <> COALESCE(r.s, 0)"
    ):
        problems.append(f"charge {charge_id}: refunded {refunded} but its refunds sum to {s}")
    problems.extend(_verify_payouts(conn))
    return problems


# What each payout state implies: transfer kind -> (posting on payout_clearing, on the developer) as
# a multiple of the payout amount.
_PAYOUT_LEGS = {"payout": (1, -1), "payout_settle": (-1, 0), "payout_fail": (-1, 1)}
_PAYOUT_TRANSFERS = {
    "pending": {"payout"},
    "settled": {"payout", "payout_settle"},
    "failed": {"payout", "payout_fail"},
}


def _verify_payouts(conn: Conn) -> list[str]:
    problems: list[str] = []
    for balance, pending in conn.execute(
        "SELECT a.balance, (SELECT COALESCE(SUM(amount), 0) FROM payouts WHERE state = 'pending') "
        "FROM accounts a WHERE a.kind = 'payout_clearing'"
    ).fetchall():
        if balance != pending:
            problems.append(f"payout_clearing: balance {balance} but pending payouts sum to {pending}")
    payouts = {
        row[0]: row[1:]
        for row in conn.execute("SELECT id, state, amount, developer_account_id FROM payouts").fetchall()
    }
    found: dict[str, set[str]] = defaultdict(set)
    for transfer_id, kind, reference, amount, clearing, developer in conn.execute(
        "SELECT t.id, t.kind, t.reference, t.amount, "
        "COALESCE((SELECT SUM(p.amount) FROM postings p JOIN accounts a ON a.id = p.account_id "
        "          WHERE p.transfer_id = t.id AND a.kind = 'payout_clearing'), 0), "
        "COALESCE((SELECT SUM(p.amount) FROM postings p JOIN payouts po ON po.id = t.reference "
        "          WHERE p.transfer_id = t.id AND p.account_id = po.developer_account_id), 0) "
        "FROM transfers t WHERE t.kind IN ('payout', 'payout_settle', 'payout_fail')"
    ).fetchall():
        if reference not in payouts:
            problems.append(f"{kind} transfer {transfer_id}: belongs to no payout")
            continue
        state, payout_amount, _ = payouts[reference]
        found[reference].add(kind)
        want_clearing, want_developer = _PAYOUT_LEGS[kind]
        if (amount, clearing, developer) != (
            payout_amount,
            want_clearing * payout_amount,
            want_developer * payout_amount,
        ):
            problems.append(
                f"{kind} transfer {transfer_id} of payout {reference} ({payout_amount}): amount {amount}, "
                f"payout_clearing {clearing:+}, developer {developer:+}"
            )
    for payout_id, (state, _, _) in payouts.items():
        expected = _PAYOUT_TRANSFERS[state]
        if found[payout_id] != expected:
            missing = ", ".join(sorted(expected - found[payout_id])) or "none"
            extra = ", ".join(sorted(found[payout_id] - expected)) or "none"
            problems.append(f"{state} payout {payout_id}: missing transfers {missing}; unexpected {extra}")
    return problems
