"""The SQLite ledger's ``Clawbacks`` concern: money a payment provider took back from a user."""

from __future__ import annotations

import uuid

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import MAX_BALANCE, AccountKind, Transfer
from gateway.ledger.rows import balance_limit_error
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.sqlite.common import Conn
from gateway.ledger.sqlite.store import SqliteStore


class SqliteClawbacks(SqliteStore):
    """A clawback: user -amount, world +amount, allowed below zero (``interfaces.Clawbacks``)."""

    async def clawback(self, user: str, amount: int, reference: str) -> Transfer:
        _require_amount(amount)
        if not isinstance(reference, str) or not reference.strip():
            raise InvalidInput("a clawback needs a reference (its idempotency key)")

        def tx(conn: Conn) -> Transfer:
            user_id = self._account_id(conn, AccountKind.USER, user)
            row = conn.execute(
                "SELECT id, amount, account_id, created_at FROM transfers WHERE kind = 'clawback' AND reference = ?",
                (reference,),
            ).fetchone()
            if row is not None:
                if row[1] != amount or row[2] != user_id:
                    raise IdempotencyConflict(
                        f"clawback reference {reference!r} was already used for a different user or amount"
                    )
                return Transfer(row[0], "clawback", row[1], reference, row[3], replayed=True)
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            conn.execute(
                "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
                "VALUES (?, 'clawback', ?, ?, ?, ?)",
                (transfer_id, amount, reference, user_id, now),
            )
            # The user's leg is written here, unguarded but for the balance limit (the money already
            # left at the provider); the world's goes through _post.
            conn.execute(
                "INSERT INTO postings (transfer_id, account_id, amount) VALUES (?, ?, ?)",
                (transfer_id, user_id, -amount),
            )
            # Its debt (migration 0010) becomes the shortfall the clawback leaves, if larger.
            updated = conn.execute(
                "UPDATE accounts SET balance = balance - ?, debt = MAX(debt, held - balance + ?) "
                "WHERE id = ? AND balance - ? >= ?",
                (amount, amount, user_id, amount, -MAX_BALANCE),
            ).rowcount
            if updated != 1:
                balance = int(conn.execute("SELECT balance FROM accounts WHERE id = ?", (user_id,)).fetchone()[0])
                raise balance_limit_error("user", user, balance, -amount)
            self._post(conn, transfer_id, [(self._system[AccountKind.WORLD], amount)], balancing=-amount)
            return Transfer(transfer_id, "clawback", amount, reference, now)

        return await self._write(tx)

    async def reverse_payout(self, payout_id: str) -> Transfer:
        def tx(conn: Conn) -> Transfer:
            payout = conn.execute(
                "SELECT developer_account_id, amount, state FROM payouts WHERE id = ?", (payout_id,)
            ).fetchone()
            if payout is None:
                raise NotFound(f"no payout {payout_id!r}")
            row = conn.execute(
                "SELECT id, amount, created_at FROM transfers WHERE kind = 'payout_reversal' AND reference = ?",
                (payout_id,),
            ).fetchone()
            if row is not None:
                return Transfer(row[0], "payout_reversal", row[1], payout_id, row[2], replayed=True)
            if payout[2] != "settled":
                raise Conflict(f"payout {payout_id} is {payout[2]}, not settled: only a settled payout is reversed")
            developer_id, amount = int(payout[0]), int(payout[1])
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            conn.execute(
                "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
                "VALUES (?, 'payout_reversal', ?, ?, ?, ?)",
                (transfer_id, amount, payout_id, developer_id, now),
            )
            self._post(conn, transfer_id, [(self._system[AccountKind.WORLD], -amount), (developer_id, amount)])
            return Transfer(transfer_id, "payout_reversal", amount, payout_id, now)

        return await self._write(tx)
