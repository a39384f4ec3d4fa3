"""The PostgreSQL ledger (asyncpg): ``PostgresLedger``.

Same semantics as the SQLite ledger (``gateway.ledger.sqlite``); what differs is how the database
keeps them under concurrency from many connections and gateway replicas:

* Every money operation is one transaction at READ COMMITTED. Balance and spending-cap guards are
  conditional ``UPDATE … WHERE balance - held >= $a``: a blocked ``UPDATE`` re-checks the newest
  row version once the lock is released, so concurrent holds can never overspend and need no
  retry. ``CHECK`` constraints back every guard.
* Row locks are always taken in one order: the keyed row (hold, charge or payout), then accounts by
  ascending id (``_lock_accounts``, ``FOR NO KEY UPDATE`` so foreign-key checks are not blocked),
  then keys by id. No two ledger transactions wait on each other in a cycle.
* Idempotency lives in unique keys: ``INSERT … ON CONFLICT DO NOTHING`` and then read the winner.
  A transaction that loses such a race is rolled back and run again, and the re-run sees the
  winner (``_RaceLost``).
* A whole transaction is re-run on serialization_failure / deadlock_detected only when it is
  idempotent by its key (hold, capture, charge, void, renew, sweep, keyed top-ups and refunds,
  payout transitions); for the others the caller gets ``Unavailable`` and nothing was written.
  Nothing is ever replayed after a lost connection: the outcome of a COMMIT whose reply never
  arrived is unknown, so the caller gets ``Unavailable`` (and retries with its idempotency key).
* Group commit: the holds, captures, voids and lease renewals one process issues concurrently are
  queued and committed together, a batch per transaction (``_submit``, ``_tx_batch``), so a busy
  user's account row is locked and committed once per batch instead of once per call. The batch
  takes its locks in the same global order (holds by call id, accounts by id, keys by id), reads
  balances and caps from the locked rows, checks each operation on its own in arrival order, and
  writes the outcome set-wise (one UPDATE per changed account or key with its summed deltas). A
  batch of holds, voids and renewals only commits with ``synchronous_commit = off`` (visible to
  every replica at once, not forced to disk: a crash voids those holds anyway); a batch with a
  capture commits durably before any of its callers is answered. A batch of one (a lone caller)
  is one auto-commit statement instead: a session-local function with the same locks, checks and
  writes (``_LONE_FUNCTIONS``, ``_run_lone``).
* ``verify`` reads every invariant from one REPEATABLE READ, READ ONLY snapshot.
* ``sweep`` claims lapsed holds with ``FOR UPDATE SKIP LOCKED``, so replicas sweeping at once void
  each hold exactly once without waiting on each other.

A module per concern, each a mixin on the machinery in ``store``:

- ``store``: the pools, transactions and retries (``_run``, ``_read``), the schema and its
  ``search_path``, running the migrations, the system accounts, the steps several concerns take
  inside a transaction (``_post``, ``_lock_accounts``, …); the ``Store`` concern (open, close,
  migrate). ``common``: the types, column lists, exceptions and batch operations the modules share.
- ``accounts``, ``keys`` (API keys and service tokens), ``holds``, ``charges`` (one-step charges,
  refunds), ``payouts``, ``reports``, ``audit`` (verify, export, import): one concern each.
- ``ledger``: ``PostgresLedger``, all of them combined.
- How holds, captures, voids and renewals commit: ``batching`` (the queue and its drainers,
  ``_submit``), ``batch_tx`` (a batch as one transaction, ``_tx_batch``), ``lone`` (a batch of one as
  one statement, ``_run_lone``), ``single`` (one operation per transaction, and the steps the
  one-step charge is made of).
- ``migrations``: the schema, as named migrations.
"""

from __future__ import annotations

from gateway.ledger.postgres.ledger import PostgresLedger

__all__ = ["PostgresLedger"]
