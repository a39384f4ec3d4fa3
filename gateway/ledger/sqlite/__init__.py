"""The SQLite ledger: ``SqliteLedger``, one SQLite file behind the ``Ledger`` interface.

One dedicated writer thread owns the only write connection. Every money operation is *one*
Python function run on that thread, inside ``BEGIN IMMEDIATE`` … ``COMMIT``: one thread hop per
transaction, not per statement. Reads run on a second thread with its own connection (WAL lets
readers proceed while the writer writes).

Correctness never depends on a Python read-then-write: overdrafts and spending caps are refused by
conditional ``UPDATE``s (zero rows updated = refused) and backed by ``CHECK`` constraints, so it
also holds when several processes (the gateway and the CLI) open the same file.

A module per concern, each a mixin on the machinery in ``store``:

- ``store``: connections, the writer/reader/syncer threads, group commit, durability (fsync of the
  WAL), migrations, system accounts; the ``Store`` concern (open, close, migrate).
- ``common``: steps several concerns share inside a transaction (``_post``, ``_account_id``, …).
- ``accounts``, ``keys`` (API keys and service tokens), ``holds``, ``charges`` (one-step charges,
  refunds), ``payouts``, ``reports``, ``audit`` (verify, export, import): one concern each.
- ``ledger``: ``SqliteLedger``, all of them combined.
- ``batch``: vectorised holds and captures for group commit; ``migrations``: the schema;
  ``write_turns``: the kernel lock writers of one file take turns with.
"""

from __future__ import annotations

from gateway.ledger.sqlite.ledger import SqliteLedger

__all__ = ["SqliteLedger"]
