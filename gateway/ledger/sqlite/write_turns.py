"""Turns at writing one SQLite ledger file, taken by every process that writes it, waited for in the kernel.

SQLite's own write lock is waited for by polling: a connection that finds it taken sleeps on a back-off schedule
that grows to 100 ms a try, and retries. Between two busy writers (``serve --workers 2``, replicas on one file, an
operator's top-up beside a loaded gateway) the one that just committed takes the lock again long before the
sleeper wakes, so a write could lose the race again and again: measured with two workers at 32 connections, p99
0.5 to 1.5 s and single ``BEGIN IMMEDIATE`` waits of 1.7 s (the busy timeout is 5 s: a top-up could fail outright).

Here each writer takes an exclusive ``flock`` on a side file (``<ledger>-writer.lock``, empty, never read) around
its ``BEGIN IMMEDIATE … COMMIT``. A waiter sleeps in the kernel and is woken the moment the holder lets go, so
turns alternate; SQLite's lock and busy timeout still stand behind it for a writer that does not take turns (an
``sqlite3`` shell). The lock belongs to the open file, so two ledgers on one file in one process take turns too,
and a process that dies lets go with it. The wait has no deadline: a turn lasts one transaction, and a writer
stopped inside one (SIGSTOP, a debugger) holds SQLite's lock as well, so nothing could be written meanwhile anyway;
the others' writes wait for it instead of failing after SQLite's busy timeout. On a filesystem that cannot
``flock`` (some FUSE and network mounts) turns are switched off with one warning and SQLite's lock alone remains.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

import structlog

log = structlog.get_logger("gateway.ledger.sqlite")

# What flock fails with where the filesystem cannot lock (some FUSE and network mounts).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL})


def lock_path(database: Path) -> Path:
    return database.with_name(database.name + "-writer.lock")


class WriteTurns:
    """``with turns:`` runs its block while no other writer of the file runs one."""

    def __init__(self, database: Path) -> None:
        """``database`` must exist. The lock file takes its permissions and, when made by root, its owner, as
        SQLite's ``-wal`` and ``-shm`` files do: an operator's ``sudo agentpay …`` must not leave a file the
        gateway's own user cannot open."""
        self.path = lock_path(database)
        self._off = False  # the filesystem cannot flock: SQLite's own lock alone, as before turns
        self._held = False
        owner = os.stat(database)
        mode = stat.S_IMODE(owner.st_mode)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, mode)  # flock needs no write access
        try:
            made = os.fstat(self._fd)
            if made.st_uid == os.geteuid() and stat.S_IMODE(made.st_mode) != mode:
                os.fchmod(self._fd, mode)  # O_CREAT's mode is cut by the umask
            if os.geteuid() == 0 and (made.st_uid, made.st_gid) != (owner.st_uid, owner.st_gid):
                os.fchown(self._fd, owner.st_uid, owner.st_gid)
        except BaseException:
            os.close(self._fd)
            raise

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> None:
        if self._off:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)  # releases the GIL while it waits
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            self._off = True
            log.warning(
                "write_turns_unavailable",
                path=str(self.path),
                error=exc.strerror,
                hint="The ledger's filesystem does not support flock; writers now wait on SQLite's own lock, "
                "which can starve one of several busy writer processes. Keep the ledger on a local filesystem",
            )
            return
        self._held = True

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._held:
            self._held = False
            fcntl.flock(self._fd, fcntl.LOCK_UN)
