"""Group commit of holds, captures, voids and lease renewals: ``PostgresBatching._submit`` queues an
operation and waits for its own outcome; a drainer task (``_drain``) takes what is queued as the
next batch and runs it on a settle connection: a batch of one as one statement (``lone``), any
other as one transaction (``batch_tx``), and, when a database error nobody foresaw rolls a batch
back, each of its operations as a transaction of its own (``single``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg

from gateway.errors import GatewayError, Unavailable
from gateway.ledger.postgres.batch_tx import PostgresBatchTx
from gateway.ledger.postgres.common import _CONNECTION_ERRORS, Conn, _CaptureOp, _HoldOp, _Op, _RenewOp, _VoidOp
from gateway.ledger.postgres.lone import PostgresLone

MAX_BATCH = 512  # most hold/capture/void/renew operations committed in one transaction


def _call_of(op: _Op) -> str | None:
    """The call id an operation settles, or None for a renewal (renewals never conflict: they extend
    whatever is still pending when they run)."""
    if isinstance(op, _HoldOp):
        return op.req.call_id
    if isinstance(op, _RenewOp):
        return None
    return op.call_id


def _deliver(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; what the batch wrote stands
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class PostgresBatching(PostgresBatchTx, PostgresLone):
    """Group commit: the queue of holds, captures, voids and renewals, and the drainers that run it."""

    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op) -> Any:
        """Queue a hold, capture, void or renewal and wait for its own outcome.

        Group commit: operations that arrive while a batch is in flight wait in ``_queue``; a
        drainer task (``_drain``) takes them all as the next batch and runs it as ONE transaction
        (``_tx_batch``), so a user's account row is locked, updated and committed once per batch
        instead of once per call. Each operation is checked on its own, in arrival order, against
        the rows the batch locked, and gets exactly the result or exception it would get alone; a
        refused or failing operation writes nothing and does not disturb the others. A batch holds
        at most one operation per call id (a later one waits for the next batch), so an operation
        always sees the committed outcome of an earlier one on the same call.

        A caller cancelled before its batch starts is dropped (nothing written); once the batch has
        started, its write stands, as when a COMMIT is under way."""
        if self._settle_pool is None:
            raise Unavailable("the ledger is not open")
        self._queue.append(op)
        if len(self._drainers) < self._batch_workers:
            self._drainers.add(asyncio.get_running_loop().create_task(self._drain()))
        return await op.future

    async def _drain(self) -> None:
        """Run batches until the queue holds nothing this drainer may take, on one connection kept
        while there is work (the pool resets a connection, a round trip, each time it is released).

        The queue is checked again after the connection is released, and the drainer leaves
        ``_drainers`` with no await in between: an operation queued at any moment is either taken
        here or finds no drainer and starts one."""
        batch: list[_Op] = []
        try:
            while True:
                if not batch:
                    batch = self._take_batch()
                    if not batch:
                        return
                try:
                    async with self._connection(settle=True) as conn:
                        while batch:
                            await self._run_batch(batch, conn)
                            batch = self._take_batch()
                            if conn.is_closed():  # lost during the batch: the pool replaces it
                                break
                except GatewayError as exc:  # the ledger is not open
                    self._answer(batch, [(False, exc)] * len(batch))
                    batch = []
                except _CONNECTION_ERRORS as exc:  # no connection to be had: the batch in hand never ran
                    error = Unavailable(
                        f"cannot reach the ledger database ({type(exc).__name__}: {exc}); nothing was written",
                        hint="Retry shortly; check that PostgreSQL is up",
                    )
                    self._answer(batch, [(False, error)] * len(batch))
                    batch = []
                except BaseException:  # cancelled (closing) or a bug: nobody may wait forever, no call stays busy
                    gone = Unavailable("the ledger stopped before the operation ran; nothing was written")
                    self._answer(batch, [(False, gone)] * len(batch))  # no-op for callers already answered
                    raise
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._drainers.discard(task)

    def _take_batch(self) -> list[_Op]:
        """The next batch: queued operations in arrival order, skipping cancelled ones; an operation
        on a call id already in this batch (or in a batch in flight) stays queued, in order. Its
        call ids are busy until ``_answer``."""
        batch: list[_Op] = []
        calls: set[str] = set()
        deferred: list[_Op] = []
        while self._queue and len(batch) < MAX_BATCH:
            op = self._queue.popleft()
            if op.future.done():  # its caller was cancelled before the batch began: nothing written
                continue
            call = _call_of(op)
            if call is not None:
                if call in calls or call in self._busy:
                    deferred.append(op)
                    continue
                calls.add(call)
            batch.append(op)
        self._queue.extendleft(reversed(deferred))
        self._busy |= calls
        return batch

    def _answer(self, batch: Sequence[_Op], outcomes: Sequence[tuple[bool, Any]]) -> None:
        """Give each caller of ``batch`` its (ok, result or exception); its call ids are free again."""
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            _deliver(op.future, ok, value)
            if (call := _call_of(op)) is not None:
                self._busy.discard(call)

    async def _run_batch(self, batch: list[_Op], conn: Conn) -> None:
        """Run one batch on ``conn`` and answer each of its callers. A database error the
        per-operation checks did not foresee (a constraint, say) rolls the batch back: its
        operations are then run one transaction each, so only the operation at fault fails."""
        outcomes: list[tuple[bool, Any]] | None = None
        try:
            try:
                if len(batch) == 1 and self._lone_path:
                    outcomes = await self._run_lone(batch[0], conn)
                if outcomes is None:
                    outcomes = await self._run(lambda c: self._tx_batch(c, batch), idempotent=True, conn=conn)
            except GatewayError as exc:
                unforeseen = not isinstance(exc, Unavailable) and isinstance(exc.__cause__, asyncpg.PostgresError)
                if unforeseen and len(batch) > 1:
                    outcomes = await self._run_singly(batch)
                else:
                    outcomes = [(False, exc)] * len(batch)
        except Exception as exc:  # noqa: BLE001 - a bug in the batch code: every caller gets the error
            outcomes = [(False, exc)] * len(batch)
        except BaseException:  # cancelled (the loop is closing): the callers must not wait forever
            self._answer(batch, [(False, Unavailable("the ledger was closed while the operation ran"))] * len(batch))
            raise
        self._answer(batch, outcomes)

    async def _run_singly(self, batch: Sequence[_Op]) -> list[tuple[bool, Any]]:
        """Each operation of a batch as a transaction of its own (``_single_*``)."""
        outcomes: list[tuple[bool, Any]] = []
        for op in batch:
            if op.future.done():  # its caller is gone; the batch wrote nothing for it
                outcomes.append((True, None))
                continue
            try:
                if isinstance(op, _HoldOp):
                    outcomes.append((True, await self._single_hold(op.req)))
                elif isinstance(op, _CaptureOp):
                    outcomes.append((True, await self._single_capture(op.call_id, op.amount)))
                elif isinstance(op, _VoidOp):
                    outcomes.append((True, await self._single_void(op.call_id)))
                else:
                    await self._single_renew(op.call_ids, op.lease_s)
                    outcomes.append((True, None))
            except Exception as exc:  # noqa: BLE001 - this operation's caller gets it; the others go on
                outcomes.append((False, exc))
        return outcomes
