"""Writers of one SQLite ledger file take turns through a kernel lock on a side file (``write_turns``), so a
waiting writer is woken when the other's transaction ends instead of polling SQLite's lock on a back-off."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import sqlite3
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway.errors import NotFound
from gateway.ledger.sqlite import SqliteLedger, write_turns
from gateway.ledger.sqlite.write_turns import lock_path


@contextmanager
def other_writers_turn(database: Path) -> Iterator[int]:
    """Hold the file's write turn as another writer would (its own open file: flock is per open file)."""
    fd = os.open(lock_path(database), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


async def flock_waiter(path: Path) -> None:
    """Return once some thread waits in the kernel for the flock on ``path`` (asking /proc/locks until one does)."""
    inode = f":{os.stat(path).st_ino} "
    async with asyncio.timeout(10):
        while True:
            for line in Path("/proc/locks").read_text().splitlines():
                if "-> FLOCK" in line and inode in line:
                    return
            await asyncio.sleep(0.01)


def balance_on_disk(database: Path, user: str) -> int:
    with sqlite3.connect(database) as conn:
        row = conn.execute("SELECT balance FROM accounts WHERE kind = 'user' AND name = ?", (user,)).fetchone()
    return int(row[0])


async def test_a_write_waits_in_the_kernel_for_another_writers_turn_and_goes_ahead_when_it_ends(
    sqlite_ledger: SqliteLedger,
) -> None:
    database = sqlite_ledger.path
    with other_writers_turn(database) as fd:
        topup = asyncio.create_task(sqlite_ledger.topup("alice", 500))
        await flock_waiter(lock_path(database))
        assert not topup.done()
        assert balance_on_disk(database, "alice") == 1_000
        fcntl.flock(fd, fcntl.LOCK_UN)
        async with asyncio.timeout(10):
            transfer = await topup
    assert transfer.amount == 500
    assert balance_on_disk(database, "alice") == 1_500


async def test_a_failed_write_gives_its_turn_back(sqlite_ledger: SqliteLedger) -> None:
    with pytest.raises(NotFound):
        await sqlite_ledger.topup("nobody", 500)
    fd = os.open(lock_path(sqlite_ledger.path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if the failed write kept its turn
    finally:
        os.close(fd)


async def test_two_ledgers_on_one_file_take_turns_and_lose_no_write(tmp_path: Path) -> None:
    database = tmp_path / "ledger.db"
    first, second = SqliteLedger(database), SqliteLedger(database)
    await first.open()
    await second.open()
    try:
        await first.create_user("alice")
        await asyncio.gather(*(ledger.topup("alice", 1) for _ in range(200) for ledger in (first, second)))
        assert await first.verify() == []
    finally:
        await first.close()
        await second.close()
    assert balance_on_disk(database, "alice") == 400


async def test_the_turns_file_sits_beside_the_ledger_empty(sqlite_ledger: SqliteLedger) -> None:
    path = lock_path(sqlite_ledger.path)
    assert path == sqlite_ledger.path.with_name("ledger.db-writer.lock")
    assert path.stat().st_size == 0


async def test_the_turns_file_takes_the_ledgers_permissions_whatever_the_umask(tmp_path: Path) -> None:
    database = tmp_path / "ledger.db"
    sqlite3.connect(database).close()
    database.chmod(0o660)
    previous = os.umask(0o077)
    try:
        ledger = SqliteLedger(database)
        await ledger.open()
        await ledger.close()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(lock_path(database).stat().st_mode) == 0o660


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
async def test_the_turns_file_made_by_root_belongs_to_the_ledgers_owner(tmp_path: Path) -> None:
    database = tmp_path / "ledger.db"
    sqlite3.connect(database).close()
    os.chown(database, 10001, 10001)  # the Docker image's user
    ledger = SqliteLedger(database)
    await ledger.open()
    await ledger.close()
    made = lock_path(database).stat()
    assert (made.st_uid, made.st_gid) == (10001, 10001)


async def test_on_a_filesystem_without_flock_writes_go_on_under_sqlites_own_lock_with_one_warning(
    sqlite_ledger: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_flock = fcntl.flock

    def no_flock(fd: int, operation: int) -> None:  # what some FUSE and network mounts answer
        if operation & fcntl.LOCK_EX:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        real_flock(fd, operation)

    monkeypatch.setattr(write_turns.fcntl, "flock", no_flock)
    with capture_logs() as logs:
        await sqlite_ledger.topup("alice", 200)
        await sqlite_ledger.topup("alice", 300)
    assert balance_on_disk(sqlite_ledger.path, "alice") == 1_500
    warnings = [entry for entry in logs if entry["event"] == "write_turns_unavailable"]
    assert len(warnings) == 1
    assert "flock" in warnings[0]["hint"]
