"""The SQLite ledger's machinery, and its ``Store`` concern (open, close, migrations).

One dedicated writer thread owns the only write connection. Every money operation is *one*
Python function run on that thread, inside ``BEGIN IMMEDIATE`` … ``COMMIT``: one thread hop per
transaction, not per statement. Reads run on a second thread with its own connection (WAL lets
readers proceed while the writer writes).

``SqliteStore`` holds all of it once: the connections and their threads, group commit (``_write``),
durability (the syncer thread's fsync of the WAL), reads (``_read``), running the migrations and
creating the system accounts. Each concern of the ledger is a mixin on it in its own module.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

from gateway.errors import BalanceLimitExceeded, Conflict, Unavailable
from gateway.ledger.base import AccountKind
from gateway.ledger.sqlite import batch as sqlite_batch
from gateway.ledger.sqlite.common import Conn, SqliteCommon
from gateway.ledger.sqlite.migrations import (
    BALANCE_LIMIT_TRIGGER,
    MIGRATIONS,
    SCHEMA_MIGRATIONS_TABLE,
    USER_DEBT_TRIGGER,
)
from gateway.ledger.sqlite.write_turns import WriteTurns

T = TypeVar("T")

SYSTEM_NAME = "system"
_SYSTEM_KINDS = (AccountKind.WORLD, AccountKind.PLATFORM_FEE, AccountKind.PAYOUT_CLEARING)
BUSY_TIMEOUT_MS = 5000


_Pending = tuple[Callable[[Conn], Any], "asyncio.Future[Any]", asyncio.AbstractEventLoop, bool, tuple[str, Any] | None]
"""A queued write: (one-at-a-time function, caller's future, its loop, durable?, (batch kind, argument))."""

_Settled = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", bool, Any]
"""An answer on its way to a caller: (its loop, its future, ok?, result or exception)."""

_MAX_GROUP = 512  # most writes committed together


def _storage_error(exc: BaseException) -> BaseException:
    """A raw sqlite3 error (disk full, I/O error, locked past the timeout) as the gateway's
    Unavailable, so callers answer 503 and background loops keep running. The balance-limit triggers'
    refusal (a write that escaped the stores' own checks) is BalanceLimitExceeded instead, and the
    user-debt triggers' (migration 0010: an overdraft that escaped them) a Conflict, as on PostgreSQL."""
    if isinstance(exc, sqlite3.IntegrityError) and str(exc).startswith(BALANCE_LIMIT_TRIGGER):
        refused = BalanceLimitExceeded(f"Refused by the ledger database: {exc}")
        refused.__cause__ = exc
        return refused
    if isinstance(exc, sqlite3.IntegrityError) and str(exc).startswith(USER_DEBT_TRIGGER):
        conflict = Conflict(f"the ledger refused a write that would break one of its rules ({USER_DEBT_TRIGGER})")
        conflict.__cause__ = exc
        return conflict
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


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class SqliteStore(SqliteCommon):
    """The store's life and machinery, shared by every concern's mixin."""

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
        by the ``batch`` module in a fixed number of statements (``fn`` is its one-at-a-time fallback)."""
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

    # --- migrations -----------------------------------------------------------------------------
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
