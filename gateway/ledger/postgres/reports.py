"""The PostgreSQL ledger's ``Reports`` concern: read-only views (a user's summary, usage, a developer's
earnings, statement and earnings breakdown), each read from one consistent snapshot.
"""

from __future__ import annotations

from gateway.errors import InvalidInput
from gateway.ledger.base import AccountKind, Earnings, EarningsBreakdown, StatementLine, UsageRow, UserSummary
from gateway.ledger.postgres.common import _CHARGE_COLUMNS, _KEY_COLUMNS, Conn
from gateway.ledger.postgres.store import PostgresStore
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import key_record as _key_record
from gateway.ledger.rows import require_limit as _require_limit


class PostgresReports(PostgresStore):
    """Read-only views: a user's summary, usage, a developer's earnings and statement."""

    async def user_summary(self, user: str, recent: int = 10) -> UserSummary:
        async def tx(conn: Conn) -> UserSummary:
            account = await self._account_row(conn, AccountKind.USER, user)
            keys = await conn.fetch(
                f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = $1 ORDER BY k.created_at, k.id", account.id
            )
            charges = await conn.fetch(
                f"SELECT {_CHARGE_COLUMNS} WHERE c.user_account_id = $1 "
                "ORDER BY c.created_at DESC, c.seq DESC LIMIT $2",
                account.id,
                max(recent, 0),
            )
            return UserSummary(
                user=user,
                balance=account.balance,
                held=account.held,
                available=account.available,
                keys=[_key_record(row) for row in keys],
                recent_charges=[_charge(row) for row in charges],
            )

        return await self._read(tx)

    async def usage(self, user: str | None = None, server: str | None = None) -> list[UsageRow]:
        async def tx(conn: Conn) -> list[UsageRow]:
            rows = await conn.fetch(
                "SELECT u.name, h.server, h.method, h.name, COUNT(*), SUM(c.amount)::bigint "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id "
                "JOIN accounts u ON u.id = c.user_account_id "
                "WHERE ($1::text IS NULL OR u.name = $1) AND ($2::text IS NULL OR h.server = $2) "
                "GROUP BY u.name, h.server, h.method, h.name ORDER BY u.name, h.server, h.method, h.name",
                user,
                server,
            )
            return [UsageRow(row[0], row[1], row[2], row[3], int(row[4]), int(row[5])) for row in rows]

        return await self._read(tx)

    async def earnings(self, developer: str) -> Earnings:
        async def tx(conn: Conn) -> Earnings:
            account = await self._account_row(conn, AccountKind.DEVELOPER, developer)
            lifetime = await conn.fetchval(
                "SELECT COALESCE(SUM(p.amount), 0)::bigint FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "WHERE p.account_id = $1 AND t.kind IN ('charge', 'refund')",
                account.id,
            )
            return Earnings(developer=developer, earnings=account.balance, lifetime=int(lifetime))

        return await self._read(tx)

    async def statement(self, developer: str, *, limit: int = 100, before: str | None = None) -> list[StatementLine]:
        """Every posting on the developer's account (charges, refunds, payouts, failed payouts),
        newest first by (created_at, transfer id); ``before`` is the last transfer id of the
        previous page."""
        _require_limit(limit)

        async def tx(conn: Conn) -> list[StatementLine]:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = await conn.fetchrow(
                    "SELECT t.created_at, t.id FROM transfers t WHERE t.id = $1 AND EXISTS "
                    "(SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.account_id = $2)",
                    before,
                    developer_id,
                )
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the last transfer id of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = await conn.fetch(
                "SELECT t.id, t.kind, SUM(p.amount)::bigint, h.server, h.name, t.charge_id, t.created_at "
                "FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "LEFT JOIN charges c ON c.id = CASE WHEN t.kind = 'charge' THEN t.id ELSE t.charge_id END "
                "LEFT JOIN holds h ON h.call_id = c.call_id "
                "WHERE p.account_id = $1 AND ($2::float8 IS NULL OR (t.created_at, t.id) < ($2, $3::text)) "
                "GROUP BY t.id, h.server, h.name ORDER BY t.created_at DESC, t.id DESC LIMIT $4",
                developer_id,
                cursor[0],
                cursor[1],
                limit,
            )
            return [StatementLine(*row) for row in rows]

        return await self._read(tx)

    async def earnings_breakdown(self, developer: str) -> list[EarningsBreakdown]:
        async def tx(conn: Conn) -> list[EarningsBreakdown]:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            # Credited = amount - fee; refunds take back (refunded - fee share), fee shares being
            # cumulative (fee * refunded // amount), exactly as refund() posts them.
            rows = await conn.fetch(
                "SELECT h.server, h.name, COUNT(*), "
                "SUM((c.amount - c.fee) - (c.refunded - c.fee * c.refunded / c.amount))::bigint "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id WHERE c.developer_account_id = $1 "
                "GROUP BY h.server, h.name ORDER BY h.server, h.name",
                developer_id,
            )
            return [EarningsBreakdown(developer, row[0], row[1], int(row[2]), int(row[3])) for row in rows]

        return await self._read(tx)
