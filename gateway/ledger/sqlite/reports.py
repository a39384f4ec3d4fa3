"""The SQLite ledger's ``Reports`` concern: read-only views (a user's summary, usage, a developer's
earnings, statement and earnings breakdown)."""

from __future__ import annotations

from gateway.errors import InvalidInput
from gateway.ledger.base import AccountKind, Earnings, EarningsBreakdown, StatementLine, UsageRow, UserSummary
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import key_record as _key_record
from gateway.ledger.rows import require_limit as _require_limit
from gateway.ledger.sqlite.common import _CHARGE_COLUMNS, _KEY_COLUMNS, Conn
from gateway.ledger.sqlite.store import SqliteStore


class SqliteReports(SqliteStore):
    """Read-only views: a user's summary, usage, a developer's earnings and statement."""

    async def user_summary(self, user: str, recent: int = 10) -> UserSummary:
        def tx(conn: Conn) -> UserSummary:
            account = self._account_row(conn, AccountKind.USER, user)
            keys = conn.execute(
                f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = ? ORDER BY k.created_at, k.id",
                (account.id,),
            ).fetchall()
            charges = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} WHERE c.user_account_id = ? "
                "ORDER BY c.created_at DESC, c.rowid DESC LIMIT ?",
                (account.id, max(recent, 0)),
            ).fetchall()
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
        def tx(conn: Conn) -> list[UsageRow]:
            rows = conn.execute(
                "SELECT u.name, h.server, h.method, h.name, COUNT(*), SUM(c.amount) "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id "
                "JOIN accounts u ON u.id = c.user_account_id "
                "WHERE (?1 IS NULL OR u.name = ?1) AND (?2 IS NULL OR h.server = ?2) "
                "GROUP BY u.name, h.server, h.method, h.name ORDER BY u.name, h.server, h.method, h.name",
                (user, server),
            ).fetchall()
            return [UsageRow(*row) for row in rows]

        return await self._read(tx)

    async def earnings(self, developer: str) -> Earnings:
        def tx(conn: Conn) -> Earnings:
            account = self._account_row(conn, AccountKind.DEVELOPER, developer)
            lifetime = conn.execute(
                "SELECT COALESCE(SUM(p.amount), 0) FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "WHERE p.account_id = ? AND t.kind IN ('charge', 'refund')",
                (account.id,),
            ).fetchone()[0]
            return Earnings(developer=developer, earnings=account.balance, lifetime=int(lifetime))

        return await self._read(tx)

    async def statement(self, developer: str, *, limit: int = 100, before: str | None = None) -> list[StatementLine]:
        """Every posting on the developer's account (charges, refunds, payouts, failed payouts),
        newest first by (created_at, transfer id); ``before`` is the last transfer id of the
        previous page."""
        _require_limit(limit)

        def tx(conn: Conn) -> list[StatementLine]:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = conn.execute(
                    "SELECT t.created_at, t.id FROM transfers t WHERE t.id = ? AND EXISTS "
                    "(SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.account_id = ?)",
                    (before, developer_id),
                ).fetchone()
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the last transfer id of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = conn.execute(
                "SELECT t.id, t.kind, SUM(p.amount), h.server, h.name, t.charge_id, t.created_at "
                "FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "LEFT JOIN charges c ON c.id = CASE WHEN t.kind = 'charge' THEN t.id ELSE t.charge_id END "
                "LEFT JOIN holds h ON h.call_id = c.call_id "
                "WHERE p.account_id = ?1 AND (?2 IS NULL OR (t.created_at, t.id) < (?2, ?3)) "
                "GROUP BY t.id ORDER BY t.created_at DESC, t.id DESC LIMIT ?4",
                (developer_id, cursor[0], cursor[1], limit),
            ).fetchall()
            return [StatementLine(*row) for row in rows]

        return await self._read(tx)

    async def earnings_breakdown(self, developer: str) -> list[EarningsBreakdown]:
        """Per (server, name): captured charges and what they credited the developer, net of refunds."""

        def tx(conn: Conn) -> list[EarningsBreakdown]:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = conn.execute(
                "SELECT h.server, h.name, COUNT(*), COALESCE(SUM(m.amount), 0) "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id "
                "LEFT JOIN (SELECT CASE WHEN t.kind = 'charge' THEN t.id ELSE t.charge_id END AS charge_id, "
                "           SUM(p.amount) AS amount "
                "           FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "           WHERE p.account_id = ?1 AND t.kind IN ('charge', 'refund') GROUP BY 1) m "
                "ON m.charge_id = c.id "
                "WHERE c.developer_account_id = ?1 GROUP BY h.server, h.name ORDER BY h.server, h.name",
                (developer_id,),
            ).fetchall()
            return [EarningsBreakdown(developer, server, name, n, int(amount)) for server, name, n, amount in rows]

        return await self._read(tx)
