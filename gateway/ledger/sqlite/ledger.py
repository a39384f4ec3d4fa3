"""``SqliteLedger``: the SQLite store's concerns, each a mixin on ``SqliteStore``, combined into one
``Ledger``."""

from __future__ import annotations

from gateway.ledger.sqlite.accounts import SqliteAccounts
from gateway.ledger.sqlite.allowances import SqliteAllowances
from gateway.ledger.sqlite.audit import SqliteAudit
from gateway.ledger.sqlite.charges import SqliteCharges
from gateway.ledger.sqlite.clawbacks import SqliteClawbacks
from gateway.ledger.sqlite.grants import SqliteGrants
from gateway.ledger.sqlite.holds import SqliteHolds
from gateway.ledger.sqlite.keys import SqliteKeys
from gateway.ledger.sqlite.payouts import SqlitePayouts
from gateway.ledger.sqlite.reports import SqliteReports


class SqliteLedger(
    SqliteAccounts,
    SqliteKeys,
    SqliteCharges,  # before SqliteHolds: a one-step charge is a hold and its capture (SqliteCharges extends it)
    SqliteHolds,
    SqlitePayouts,
    SqliteClawbacks,
    SqliteAllowances,
    SqliteGrants,
    SqliteReports,
    SqliteAudit,
):
    """``Ledger`` on one SQLite file. Safe to open from several processes at once."""
