"""SQLite durability: a durable write (a capture) is answered only after its WAL frames are fsynced,
by a syncer thread, so the writer goes on committing holds meanwhile; a failed fsync is reported to
the callers it should have covered."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from gateway.errors import Unavailable
from gateway.ledger.base import HoldStatus
from gateway.ledger.sqlite import SqliteLedger

from .conftest import HoldFactory


@pytest.fixture
async def sqlite_ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        await ledger.create_user("alice")
        await ledger.create_developer("acme")
        await ledger.topup("alice", 1_000)
        yield ledger
    finally:
        await ledger.close()


@contextmanager
def syncer_paused(ledger: SqliteLedger) -> Iterator[None]:
    assert ledger._syncer is not None
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        release.wait(10)

    ledger._syncer.submit(block)
    assert started.wait(10)
    try:
        yield
    finally:
        release.set()


async def test_a_capture_is_answered_only_after_its_fsync_while_holds_go_on(
    sqlite_ledger: SqliteLedger, hold_req: HoldFactory
) -> None:
    ledger = sqlite_ledger
    assert (await ledger.hold(hold_req("first", amount=100))).ok
    with syncer_paused(ledger):
        capture = asyncio.ensure_future(ledger.capture("first"))
        # The next call's hold commits and is answered although the capture's fsync has not run.
        second = await asyncio.wait_for(ledger.hold(hold_req("second", amount=100)), 10)
        assert second.status is HoldStatus.OK and second.available == 800
        assert not capture.done()
    charge = await asyncio.wait_for(capture, 10)
    assert charge.id == "ch_first"


async def test_a_failed_fsync_fails_the_captures_it_covered(
    sqlite_ledger: SqliteLedger, hold_req: HoldFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = sqlite_ledger
    assert (await ledger.hold(hold_req("call", amount=100))).ok
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(Unavailable, match="fsync of the WAL failed"):
        await ledger.capture("call")
    monkeypatch.setattr(os, "fsync", real_fsync)
    # The commit itself stands (like any write whose fsync failed, it may or may not survive a power
    # loss); a retried capture is idempotent and answers with the same charge once the disk is back.
    assert (await ledger.capture("call")).id == "ch_call"
    assert await ledger.verify() == []
