"""The SQLite ledger's ``Payouts`` concern: developers' earnings on their way out (pending, then
settled or failed)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from gateway.errors import Conflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, Payout, PayoutState
from gateway.ledger.rows import payout as _payout
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_name as _require_name
from gateway.ledger.sqlite.common import Conn, _WouldGoNegative
from gateway.ledger.sqlite.store import SqliteStore
from gateway.money import format_cents

_PAYOUT_COLUMNS = """
    p.id, a.name, p.amount, p.state, p.reference, p.created_at, p.completed_at
    FROM payouts p JOIN accounts a ON a.id = p.developer_account_id
"""


class SqlitePayouts(SqliteStore):
    """Developers' earnings on their way out."""

    @staticmethod
    def _payout_by_id(conn: Conn, payout_id: str) -> Payout:
        row = conn.execute(f"SELECT {_PAYOUT_COLUMNS} WHERE p.id = ?", (payout_id,)).fetchone()
        if row is None:
            raise NotFound(f"no payout {payout_id!r}")
        return _payout(row)

    async def create_payout(self, developer: str, amount: int | None = None) -> Payout:
        """developer -> payout_clearing, pending. The debit is the guarded ``UPDATE`` in ``_post``,
        so concurrent payouts (from any process) can never take the developer below zero."""
        if amount is not None:
            _require_amount(amount, "payout amount")

        def tx(conn: Conn) -> Payout:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            available = self._available(conn, developer_id)
            payout = available if amount is None else amount
            if payout <= 0:
                raise InvalidInput(f"developer {developer!r} has no earnings to pay out")
            payout_id = "po_" + uuid.uuid4().hex
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            conn.execute(
                "INSERT INTO payouts (id, developer_account_id, amount, created_at) VALUES (?, ?, ?, ?)",
                (payout_id, developer_id, payout, now),
            )
            conn.execute(
                "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
                "VALUES (?, 'payout', ?, ?, ?, ?)",
                (transfer_id, payout, payout_id, developer_id, now),
            )
            try:
                self._post(
                    conn,
                    transfer_id,
                    [(developer_id, -payout), (self._system[AccountKind.PAYOUT_CLEARING], payout)],
                )
            except _WouldGoNegative:
                raise Conflict(
                    f"cannot pay out {format_cents(payout)} cents: developer {developer!r} has only "
                    f"{format_cents(available)} cents of earnings",
                    hint="Pay out at most the available earnings, or give no amount to pay out all of them",
                ) from None
            return self._payout_by_id(conn, payout_id)

        return await self._write(tx)

    async def settle_payout(self, payout_id: str, reference: str) -> Payout:
        _require_name(reference, "payout reference")

        def tx(conn: Conn) -> Payout:
            developer_id, amount = self._final_payout_check(conn, payout_id, PayoutState.SETTLED, reference)
            if amount is None:
                return self._payout_by_id(conn, payout_id)
            self._complete_payout(
                conn,
                payout_id,
                PayoutState.SETTLED,
                reference,
                developer_id,
                [(self._system[AccountKind.PAYOUT_CLEARING], -amount), (self._system[AccountKind.WORLD], amount)],
            )
            return self._payout_by_id(conn, payout_id)

        return await self._write(tx)

    async def fail_payout(self, payout_id: str) -> Payout:
        def tx(conn: Conn) -> Payout:
            developer_id, amount = self._final_payout_check(conn, payout_id, PayoutState.FAILED, None)
            assert amount is not None  # only a settle with the same reference is a replay
            self._complete_payout(
                conn,
                payout_id,
                PayoutState.FAILED,
                None,
                developer_id,
                [(self._system[AccountKind.PAYOUT_CLEARING], -amount), (developer_id, amount)],
            )
            return self._payout_by_id(conn, payout_id)

        return await self._write(tx)

    @staticmethod
    def _final_payout_check(
        conn: Conn, payout_id: str, target: PayoutState, reference: str | None
    ) -> tuple[int, int | None]:
        """(developer account id, amount) of a pending payout; amount None when ``target`` is a
        replay (settled again with the same reference). Raises NotFound, or Conflict when the payout
        already reached another final state."""
        row = conn.execute(
            "SELECT developer_account_id, amount, state, reference FROM payouts WHERE id = ?", (payout_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no payout {payout_id!r}")
        developer_id, amount, state, prior = row
        if state == PayoutState.PENDING:
            return int(developer_id), int(amount)
        if state == PayoutState.SETTLED == target and prior == reference:
            return int(developer_id), None
        settled = f" with reference {prior!r}" if state == PayoutState.SETTLED else ""
        raise Conflict(
            f"payout {payout_id} is already {state}{settled}; it cannot be {target.value}",
            hint="A payout leaves 'pending' once: settle it or fail it, not both",
        )

    def _complete_payout(
        self,
        conn: Conn,
        payout_id: str,
        state: PayoutState,
        reference: str | None,
        developer_id: int,
        legs: Sequence[tuple[int, int]],
    ) -> None:
        now = self._clock()
        updated = conn.execute(
            "UPDATE payouts SET state = ?, reference = ?, completed_at = ? WHERE id = ? AND state = 'pending'",
            (state.value, reference, now, payout_id),
        ).rowcount
        if updated != 1:
            raise Conflict(f"payout {payout_id} is no longer pending")
        amount = sum(a for _, a in legs if a > 0)
        transfer_id = "tr_" + uuid.uuid4().hex
        kind = "payout_settle" if state == PayoutState.SETTLED else "payout_fail"
        conn.execute(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (transfer_id, kind, amount, payout_id, developer_id, now),
        )
        self._post(conn, transfer_id, legs)

    async def list_payouts(self, developer: str | None = None) -> list[Payout]:
        """Newest first."""

        def tx(conn: Conn) -> list[Payout]:
            developer_id = None if developer is None else self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = conn.execute(
                f"SELECT {_PAYOUT_COLUMNS} WHERE ?1 IS NULL OR p.developer_account_id = ?1 "
                "ORDER BY p.created_at DESC, p.id DESC",
                (developer_id,),
            ).fetchall()
            return [_payout(row) for row in rows]

        return await self._read(tx)
