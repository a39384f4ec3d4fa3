"""The PostgreSQL ledger's ``Clawbacks`` concern: money a payment provider took back from a user."""

from __future__ import annotations

import uuid

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, Transfer
from gateway.ledger.postgres.common import Conn
from gateway.ledger.postgres.store import PostgresStore
from gateway.ledger.rows import require_amount as _require_amount


class PostgresClawbacks(PostgresStore):
    """A clawback: user -amount, world +amount, allowed below zero (``interfaces.Clawbacks``)."""

    async def clawback(self, user: str, amount: int, reference: str) -> Transfer:
        _require_amount(amount)
        if not isinstance(reference, str) or not reference.strip():
            raise InvalidInput("a clawback needs a reference (its idempotency key)")

        async def tx(conn: Conn) -> Transfer:
            user_id = await self._account_id(conn, AccountKind.USER, user)
            row = await conn.fetchrow(
                "SELECT id, amount, account_id, created_at FROM transfers WHERE kind = 'clawback' AND reference = $1",
                reference,
            )
            if row is not None:
                if row[1] != amount or row[2] != user_id:
                    raise IdempotencyConflict(
                        f"clawback reference {reference!r} was already used for a different user or amount"
                    )
                return Transfer(row[0], "clawback", row[1], reference, row[3], replayed=True)
            world = self._system[AccountKind.WORLD]
            await self._lock_accounts(conn, [world, user_id])
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            await self._insert_transfer(conn, transfer_id, "clawback", amount, reference, user_id, None, now)
            # Its debt (migration 0010) becomes the shortfall the clawback will leave, if larger, before
            # the debit, which the database refuses below -debt. Unguarded but for the balance limit:
            # the money already left at the provider.
            await conn.execute(
                "UPDATE accounts SET debt = GREATEST(debt, held - balance + $1) WHERE id = $2", amount, user_id
            )
            await self._post(conn, transfer_id, [(user_id, -amount), (world, amount)], unguarded=(user_id,))
            return Transfer(transfer_id, "clawback", amount, reference, now)

        return await self._run(tx, idempotent=True)

    async def reverse_payout(self, payout_id: str) -> Transfer:
        async def tx(conn: Conn) -> Transfer:
            payout = await conn.fetchrow(
                "SELECT developer_account_id, amount, state FROM payouts WHERE id = $1 FOR UPDATE", payout_id
            )
            if payout is None:
                raise NotFound(f"no payout {payout_id!r}")
            row = await conn.fetchrow(
                "SELECT id, amount, created_at FROM transfers WHERE kind = 'payout_reversal' AND reference = $1",
                payout_id,
            )
            if row is not None:
                return Transfer(row[0], "payout_reversal", row[1], payout_id, row[2], replayed=True)
            if payout[2] != "settled":
                raise Conflict(f"payout {payout_id} is {payout[2]}, not settled: only a settled payout is reversed")
            developer_id, amount = int(payout[0]), int(payout[1])
            world = self._system[AccountKind.WORLD]
            await self._lock_accounts(conn, [world, developer_id])
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            await self._insert_transfer(
                conn, transfer_id, "payout_reversal", amount, payout_id, developer_id, None, now
            )
            await self._post(conn, transfer_id, [(world, -amount), (developer_id, amount)])
            return Transfer(transfer_id, "payout_reversal", amount, payout_id, now)

        return await self._run(tx, idempotent=True)
