"""A side store on the ledger's SQLite file: its own connection, on its own single worker thread.

Writes (rare: a sign-up, a sign-in, a link) run in ``BEGIN IMMEDIATE`` in this process's turn at
writing the file (``ledger.sqlite.write_turns``, the same turns the ledger's writer takes, so a busy
ledger cannot starve them), reads in a plain ``BEGIN``; both on the one thread, so the connection is
never shared between threads. WAL (the ledger's mode) lets the ledger's reader and writer go on
meanwhile; ``busy_timeout`` covers a writer that does not take turns.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.errors import Unavailable
from gateway.ledger.sqlite.write_turns import WriteTurns
from gateway.storage.migrations import SQLITE_SCHEMA_MIGRATIONS, Migration, check_migrations

T = TypeVar("T")
Conn = sqlite3.Connection
BUSY_TIMEOUT_MS = 5000


def _statements(script: str) -> list[str]:
    statements, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            statements.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buf.strip()[:80]!r}")
    return statements


class SqliteSide:
    """One concern's connection to the ledger's SQLite file."""

    def __init__(
        self,
        path: str | Path,
        *,
        concern: str,
        migrations: Sequence[Migration],
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_migrations(concern, migrations)
        self.path = Path(path)
        self.concern = concern
        self._migrations = tuple(migrations)
        self._clock = clock
        self._thread: ThreadPoolExecutor | None = None
        self._conn: Conn | None = None
        self._turns: WriteTurns | None = None

    async def open(self) -> None:
        if self._conn is not None:
            return
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.concern}-sqlite")
        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(self._thread, self._connect)
        except sqlite3.Error as exc:
            await self.close()
            raise Unavailable(f"cannot open the database {self.path}: {exc}", hint="Check the database URL") from exc
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        thread, conn, turns = self._thread, self._conn, self._turns
        self._thread = self._conn = self._turns = None
        if thread is None:
            return
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(thread, conn.close)
        thread.shutdown(wait=True)
        if turns is not None:
            turns.close()

    def _connect(self) -> Conn:
        memory = str(self.path) == ":memory:"  # a private in-memory database (tests only)
        if not memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if not memory:
                self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")  # writes are rare: each is on disk when it returns
            conn.execute("PRAGMA foreign_keys = ON")
            self._turns = None if memory else WriteTurns(self.path)
            for name, script in self._migrations:
                self._in_txn(conn, "BEGIN IMMEDIATE", functools.partial(self._apply, name=name, script=script))
        except BaseException:
            conn.close()
            if self._turns is not None:
                self._turns.close()
                self._turns = None
            raise
        return conn

    @staticmethod
    def _enable_wal(conn: Conn) -> None:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = 0.001
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                    return
                conn.execute("PRAGMA journal_mode = WAL").fetchall()
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)  # on this store's own thread, never the event loop
                delay = min(delay * 2, 0.05)

    def _apply(self, conn: Conn, name: str, script: str) -> None:
        conn.execute(SQLITE_SCHEMA_MIGRATIONS)
        if conn.execute("SELECT 1 FROM schema_migrations WHERE name = ?", (name,)).fetchone():
            return  # applied earlier, or by another process that got here first
        for statement in _statements(script):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, self._clock()))

    def _in_txn(self, conn: Conn, begin: str, fn: Callable[[Conn], T]) -> T:
        if begin == "BEGIN IMMEDIATE" and self._turns is not None:
            with self._turns:
                return self._txn(conn, begin, fn)
        return self._txn(conn, begin, fn)

    @staticmethod
    def _txn(conn: Conn, begin: str, fn: Callable[[Conn], T]) -> T:
        conn.execute(begin)
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def _run(self, begin: str, fn: Callable[[Conn], T]) -> T:
        if self._thread is None or self._conn is None:
            raise Unavailable(f"the {self.concern} store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, self._in_txn, self._conn, begin, fn)
        except sqlite3.IntegrityError:
            raise  # the concern's store turns a constraint into its own error
        except sqlite3.Error as exc:
            raise Unavailable(
                f"the database failed: {exc}", hint="Nothing was written; retry shortly or check the disk"
            ) from exc

    async def write(self, fn: Callable[[Conn], T]) -> T:
        """``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction (rolled back if it raises)."""
        return await self._run("BEGIN IMMEDIATE", fn)

    async def read(self, fn: Callable[[Conn], T]) -> T:
        """``fn(conn)`` in one read transaction (a consistent snapshot)."""
        return await self._run("BEGIN", fn)

    async def applied_migrations(self) -> list[str]:
        prefix = f"{self.concern}_"
        return await self.read(
            lambda c: [
                row[0]
                for row in c.execute(
                    "SELECT name FROM schema_migrations WHERE substr(name, 1, ?) = ? ORDER BY name",
                    (len(prefix), prefix),
                )
            ]
        )
