"""The PostgreSQL ledger's ``Payouts`` concern: developers' earnings moved to payout_clearing (pending),
then settled to the world or failed back to the developer.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from gateway.errors import Conflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, Payout, PayoutState
from gateway.ledger.postgres.common import Conn, _WouldGoNegative
from gateway.ledger.postgres.store import PostgresStore
from gateway.ledger.rows import payout as _payout
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_name as _require_name
from gateway.money import format_cents

_PAYOUT_COLUMNS = """
    p.id, a.name, p.amount, p.state, p.reference, p.created_at, p.completed_at, p.developer_account_id
    FROM payouts p JOIN accounts a ON a.id = p.developer_account_id
"""


class PostgresPayouts(PostgresStore):
    """Developers' earnings on their way out."""

    async def create_payout(self, developer: str, amount: int | None = None) -> Payout:
        if amount is not None:
            _require_amount(amount, "payout amount")

        async def tx(conn: Conn) -> Payout:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            clearing = self._system[AccountKind.PAYOUT_CLEARING]
            locked = await self._lock_accounts(conn, [developer_id, clearing])
            available = int(locked[developer_id]["balance"] - locked[developer_id]["held"])
            value = available if amount is None else amount
            if value <= 0:
                raise InvalidInput(f"developer {developer!r} has no earnings to pay out")
            payout_id = "po_" + uuid.uuid4().hex
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            await self._insert_transfer(conn, transfer_id, "payout", value, payout_id, developer_id, None, now)
            try:  # the guarded UPDATE in _post refuses to take the developer below zero
                await self._post(conn, transfer_id, [(developer_id, -value), (clearing, value)])
            except _WouldGoNegative:
                raise Conflict(
                    f"cannot pay out {format_cents(value)} cents: developer {developer!r} has only "
                    f"{format_cents(available)} cents of earnings",
                    hint="Pay out at most the available earnings, or give no amount to pay out all of them",
                ) from None
            await conn.execute(
                "INSERT INTO payouts (id, developer_account_id, amount, transfer_id, created_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                payout_id,
                developer_id,
                value,
                transfer_id,
                now,
            )
            return Payout(payout_id, developer, value, PayoutState.PENDING, None, now, None)

        # Not idempotent (no caller key): never re-run; with the fixed lock order it never deadlocks.
        return await self._run(tx, idempotent=False)

    async def settle_payout(self, payout_id: str, reference: str) -> Payout:
        _require_name(reference, "payout reference")

        async def tx(conn: Conn) -> Payout:
            payout, developer_id = await self._pending_payout(conn, payout_id, PayoutState.SETTLED, reference)
            if payout.state is PayoutState.SETTLED:
                return payout  # settled again with the same reference
            clearing, world = self._system[AccountKind.PAYOUT_CLEARING], self._system[AccountKind.WORLD]
            return await self._complete_payout(
                conn,
                payout,
                PayoutState.SETTLED,
                reference,
                developer_id,
                [(clearing, -payout.amount), (world, payout.amount)],
            )

        return await self._run(tx, idempotent=True)

    async def fail_payout(self, payout_id: str) -> Payout:
        async def tx(conn: Conn) -> Payout:
            payout, developer_id = await self._pending_payout(conn, payout_id, PayoutState.FAILED, None)
            clearing = self._system[AccountKind.PAYOUT_CLEARING]
            return await self._complete_payout(
                conn,
                payout,
                PayoutState.FAILED,
                None,
                developer_id,
                [(clearing, -payout.amount), (developer_id, payout.amount)],
            )

        return await self._run(tx, idempotent=True)

    async def _pending_payout(
        self, conn: Conn, payout_id: str, target: PayoutState, reference: str | None
    ) -> tuple[Payout, int]:
        """The payout, locked, and its developer account id. It is pending, or (a replay) already
        settled with the same reference when ``target`` is settled. Raises NotFound, or Conflict
        when the payout already reached another final state."""
        payout, developer_id = await self._payout_by_id(conn, payout_id, lock=True)
        if payout.state is PayoutState.PENDING:
            return payout, developer_id
        if payout.state is PayoutState.SETTLED is target and payout.reference == reference:
            return payout, developer_id
        settled = f" with reference {payout.reference!r}" if payout.state is PayoutState.SETTLED else ""
        raise Conflict(
            f"payout {payout_id} is already {payout.state}{settled}; it cannot be {target.value}",
            hint="A payout leaves 'pending' once: settle it or fail it, not both",
        )

    async def _complete_payout(
        self,
        conn: Conn,
        payout: Payout,
        state: PayoutState,
        reference: str | None,
        developer_id: int,
        legs: Sequence[tuple[int, int]],
    ) -> Payout:
        """pending -> ``state`` (the payout row is locked by the caller) and its transfer."""
        await self._lock_accounts(conn, [account for account, _ in legs])
        now = self._clock()
        updated = await conn.fetchval(
            "UPDATE payouts SET state = $1, reference = $2, completed_at = $3 "
            "WHERE id = $4 AND state = 'pending' RETURNING id",
            state.value,
            reference,
            now,
            payout.id,
        )
        if updated is None:
            raise Conflict(f"payout {payout.id} is no longer pending")
        transfer_id = "tr_" + uuid.uuid4().hex
        kind = "payout_settle" if state is PayoutState.SETTLED else "payout_fail"
        await self._insert_transfer(conn, transfer_id, kind, payout.amount, payout.id, developer_id, None, now)
        await self._post(conn, transfer_id, legs)
        return Payout(payout.id, payout.developer, payout.amount, state, reference, payout.created_at, now)

    async def list_payouts(self, developer: str | None = None) -> list[Payout]:
        """Newest first."""

        async def tx(conn: Conn) -> list[Payout]:
            developer_id = None if developer is None else await self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = await conn.fetch(
                f"SELECT {_PAYOUT_COLUMNS} WHERE ($1::bigint IS NULL OR p.developer_account_id = $1) "
                "ORDER BY p.created_at DESC, p.id DESC",
                developer_id,
            )
            return [_payout(row) for row in rows]

        return await self._read(tx)

    @staticmethod
    async def _payout_by_id(conn: Conn, payout_id: str, *, lock: bool = False) -> tuple[Payout, int]:
        row = await conn.fetchrow(
            f"SELECT {_PAYOUT_COLUMNS} WHERE p.id = $1" + (" FOR NO KEY UPDATE OF p" if lock else ""),
            payout_id,
        )
        if row is None:
            raise NotFound(f"no payout {payout_id!r}")
        return _payout(row), int(row[7])
