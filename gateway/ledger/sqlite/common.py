"""What several concerns of the SQLite ledger share: the column lists of keys and charges, and
``SqliteCommon``, the steps run inside a transaction (an account's id, row and available balance, a
key's remaining cap, reading back a charge or a key, and ``_post``, the guarded write of a
transfer's postings).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.errors import NotFound
from gateway.ledger.base import MAX_BALANCE, Account, AccountKind, Charge, KeyRecord
from gateway.ledger.rows import balance_limit_error, within_balance_limit
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import key_record as _key_record

Conn = sqlite3.Connection

_KEY_COLUMNS = """
    k.id, a.name, k.server, k.prefix, k.created_at, k.expires_at, k.revoked_at,
    k.spend_limit, k.spent, k.held, k.name, k.last_used_at
    FROM keys k JOIN accounts a ON a.id = k.user_account_id
"""
_CHARGE_COLUMNS = """
    c.id, c.call_id, u.name, d.name, h.server, h.method, h.name, c.amount, c.fee, c.refunded,
    c.created_at, c.balance_after
    FROM charges c
    JOIN holds h ON h.call_id = c.call_id
    JOIN accounts u ON u.id = c.user_account_id
    JOIN accounts d ON d.id = c.developer_account_id
"""


class _WouldGoNegative(Exception):
    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} would go negative")
        self.account_id = account_id


class SqliteCommon:
    """Steps shared by several concerns; each runs inside the caller's transaction."""

    @staticmethod
    def _account_id(conn: Conn, kind: AccountKind, name: str) -> int:
        row = conn.execute("SELECT id FROM accounts WHERE kind = ? AND name = ?", (kind.value, name)).fetchone()
        if row is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return int(row[0])

    @staticmethod
    def _available(conn: Conn, account_id: int) -> int:
        return int(conn.execute("SELECT balance - held FROM accounts WHERE id = ?", (account_id,)).fetchone()[0])

    @staticmethod
    def _spend_remaining(conn: Conn, key_id: str | None) -> int | None:
        if key_id is None:
            return None
        row = conn.execute("SELECT spend_limit - spent - held FROM keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    @staticmethod
    def _post(conn: Conn, transfer_id: str, legs: Sequence[tuple[int, int]], *, balancing: int = 0) -> None:
        """Write balanced postings and apply them to balances. A debit that would take a
        non-world account's available balance below zero raises ``_WouldGoNegative`` (a credit always
        passes: a user in debt after a clawback can be topped up or refunded); one that would
        take any balance outside +-MAX_BALANCE raises BalanceLimitExceeded (the caller's savepoint or
        transaction then rolls back every leg already applied).
        ``balancing``: the sum of legs of this transfer the caller has already written itself."""
        legs = [(account, amount) for account, amount in legs if amount != 0]
        if balancing + sum(amount for _, amount in legs) != 0:
            raise AssertionError(f"unbalanced transfer {transfer_id}: {legs}")
        for account, amount in legs:
            conn.execute(
                "INSERT INTO postings (transfer_id, account_id, amount) VALUES (?, ?, ?)",
                (transfer_id, account, amount),
            )
            # Checked arithmetic: a leg is at most MAX_AMOUNT and a balance within +-MAX_BALANCE, so the
            # sum cannot overflow SQLite's 64-bit integers (which would make it a REAL).
            # A credit also lowers a user's debt (migration 0010) to the shortfall it leaves, if any.
            updated = conn.execute(
                "UPDATE accounts SET balance = balance + ?, "
                "debt = CASE WHEN ? > 0 AND debt > 0 THEN MAX(0, MIN(debt, held - balance - ?)) ELSE debt END "
                "WHERE id = ? AND (kind = 'world' OR ? > 0 OR balance - held + ? >= 0) AND balance + ? BETWEEN ? AND ?",
                (amount, amount, amount, account, amount, amount, amount, -MAX_BALANCE, MAX_BALANCE),
            ).rowcount
            if updated != 1:
                row = conn.execute("SELECT kind, name, balance FROM accounts WHERE id = ?", (account,)).fetchone()
                if row is not None and not within_balance_limit(int(row[2]) + amount):
                    raise balance_limit_error(row[0], row[1], int(row[2]), amount)
                raise _WouldGoNegative(account)

    def _charge_by_id(self, conn: Conn, charge_id: str) -> Charge:
        row = conn.execute(f"SELECT {_CHARGE_COLUMNS} WHERE c.id = ?", (charge_id,)).fetchone()
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        return _charge(row)

    @staticmethod
    def _key_by_id(conn: Conn, key_id: str) -> KeyRecord:
        row = conn.execute(f"SELECT {_KEY_COLUMNS} WHERE k.id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _key_record(row)

    @staticmethod
    def _account_row(conn: Conn, kind: AccountKind, name: str) -> Account:
        row = conn.execute(
            "SELECT id, kind, name, balance, held FROM accounts WHERE kind = ? AND name = ?",
            (kind.value, name),
        ).fetchone()
        if row is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return Account(id=row[0], kind=AccountKind(row[1]), name=row[2], balance=row[3], held=row[4])
