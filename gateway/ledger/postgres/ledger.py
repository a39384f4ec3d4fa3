"""``PostgresLedger``: the PostgreSQL store's concerns, each a mixin on ``PostgresStore``, combined
into one ``Ledger``."""

from __future__ import annotations

from gateway.ledger.postgres.accounts import PostgresAccounts
from gateway.ledger.postgres.allowances import PostgresAllowances
from gateway.ledger.postgres.audit import PostgresAudit
from gateway.ledger.postgres.charges import PostgresCharges
from gateway.ledger.postgres.clawbacks import PostgresClawbacks
from gateway.ledger.postgres.grants import PostgresGrants
from gateway.ledger.postgres.holds import PostgresHolds
from gateway.ledger.postgres.keys import PostgresKeys
from gateway.ledger.postgres.payouts import PostgresPayouts
from gateway.ledger.postgres.reports import PostgresReports


class PostgresLedger(
    PostgresAccounts,
    PostgresKeys,
    PostgresHolds,
    PostgresCharges,
    PostgresPayouts,
    PostgresClawbacks,
    PostgresAllowances,
    PostgresGrants,
    PostgresReports,
    PostgresAudit,
):
    """``Ledger`` on PostgreSQL. Any number of gateway replicas may share one database."""
