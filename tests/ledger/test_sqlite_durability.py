"""SQLite durability: a durable write (a capture) is answered only after its WAL frames are fsynced,
by a syncer thread, so the writer goes on committing holds meanwhile; a failed fsync is reported to
the callers it should have covered."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from gateway.errors import Unavailable
from gateway.ledger.base import AccountKind, HoldStatus
from gateway.ledger.sqlite import SqliteLedger

from .conftest import HoldFactory, thread_paused


async def test_a_capture_is_answered_only_after_its_fsync_while_holds_go_on(
    sqlite_ledger: SqliteLedger, hold_req: HoldFactory
) -> None:
    ledger = sqlite_ledger
    assert (await ledger.hold(hold_req("first", amount=100))).ok
    with thread_paused(ledger._syncer):
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
    # Linux may drop the pages of a failed fsync, so a later successful fsync proves nothing: this
    # ledger confirms no durable write again, even once the disk is back.
    assert (await ledger.hold(hold_req("later", amount=100))).ok
    with pytest.raises(Unavailable, match="fsync of the WAL failed"):
        await ledger.capture("later")
    # Reopened (a restarted gateway), the commits stand and a retried capture is idempotent.
    await ledger.close()
    await ledger.open()
    assert (await ledger.capture("call")).id == "ch_call"
    assert (await ledger.capture("later")).id == "ch_later"
    assert await ledger.verify() == []


async def test_a_caller_whose_event_loop_closed_does_not_stall_the_writer(sqlite_ledger: SqliteLedger) -> None:
    """A write queued from an event loop that is gone by the time it commits is dropped quietly;
    the writer goes on answering everyone else."""
    ledger = sqlite_ledger

    def caller_on_a_loop_that_then_closes() -> None:
        other = asyncio.new_event_loop()
        task = other.create_task(ledger.topup("alice", 5, reference="from-a-closed-loop"))
        other.run_until_complete(asyncio.sleep(0))  # the top-up reaches the writer's queue
        task.cancel()
        other.run_until_complete(asyncio.gather(task, return_exceptions=True))
        other.close()

    with thread_paused(ledger._writer):
        thread = threading.Thread(target=caller_on_a_loop_that_then_closes)
        thread.start()
        thread.join(10)
    # The closed loop's top-up still commits; later callers are answered.
    await asyncio.wait_for(ledger.topup("alice", 7, reference="after"), 10)
    assert (await ledger.get_account(AccountKind.USER, "alice")).balance == 1_000 + 5 + 7
