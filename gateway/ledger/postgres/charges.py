"""The PostgreSQL ledger's ``Charges`` concern: the one-step charge (a hold and its capture in one
transaction, made of the steps in ``single``), refunds, and reading charges back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import (
    AccountKind,
    Charge,
    ChargeResult,
    HoldOutcome,
    HoldRequest,
    HoldState,
    HoldStatus,
    Transfer,
)
from gateway.ledger.postgres.common import _CHARGE_COLUMNS, Conn, _Rollback, _WouldGoNegative
from gateway.ledger.postgres.single import PostgresSingle
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_limit as _require_limit
from gateway.money import format_cents


class PostgresCharges(PostgresSingle):
    """One-step charges and refunds, and reading charges back."""

    async def charge(self, req: HoldRequest) -> ChargeResult:
        self._check_hold_request(req)

        async def tx(conn: Conn) -> ChargeResult:
            user_id, developer_id = await self._parties(conn, req)
            if not await self._insert_hold(conn, req, user_id, developer_id, self._clock()):
                existing = await self._existing_hold(conn, req, user_id, developer_id)
                if existing["state"] == HoldState.VOIDED:
                    raise Conflict(f"call {req.call_id!r} was released without a charge; use a new idempotency key")
                if existing["state"] == HoldState.PENDING:
                    raise Conflict(
                        f"call {req.call_id!r} is a pending hold; capture or release it instead of charging again"
                    )
                return ChargeResult(
                    HoldStatus.REPLAYED,
                    available=await self._available(conn, user_id),
                    charge=await self._charge_by_id(conn, existing["charge_id"]),
                    spend_remaining=await self._spend_remaining(conn, req.key_id),
                )
            # The capture below locks the developer and platform accounts too: take every account
            # lock now, in id order, before the reservation locks the key row.
            await self._lock_accounts(conn, [user_id, developer_id, self._system[AccountKind.PLATFORM_FEE]])
            try:
                await self._reserve(conn, req, user_id)
            except _Rollback as refused:
                outcome = refused.result
                assert isinstance(outcome, HoldOutcome)
                refusal = ChargeResult(outcome.status, outcome.available, None, outcome.spend_remaining)
                raise _Rollback(refusal) from None
            charge = await self._tx_capture(conn, req.call_id, None)
            return ChargeResult(
                HoldStatus.OK,
                available=charge.balance_after,
                charge=charge,
                spend_remaining=await self._spend_remaining(conn, req.key_id),
            )

        return await self._run(tx, idempotent=True)

    async def refund(self, charge_id: str, amount: int | None = None, reference: str | None = None) -> Transfer:
        """Reverse all or part of a charge: developer -share, platform_fee -fee share, user +amount.

        ``amount`` defaults to what remains refundable. Cumulative refunds never exceed the charge
        (Conflict). A repeated non-None ``reference`` returns the original refund with
        ``replayed=True``; the same reference for another charge or amount raises
        IdempotencyConflict. Raises Conflict when the developer's unpaid earnings cannot cover it.
        """
        if amount is not None:
            _require_amount(amount, "refund amount")

        async def tx(conn: Conn) -> Transfer:
            return await self._tx_refund(conn, charge_id, amount, reference)

        return await self._run(tx, idempotent=reference is not None)

    async def _tx_refund(self, conn: Conn, charge_id: str, amount: int | None, reference: str | None) -> Transfer:
        row = await conn.fetchrow(
            "SELECT c.amount, c.fee, c.refunded, c.user_account_id, c.developer_account_id, h.key_id "
            "FROM charges c JOIN holds h ON h.call_id = c.call_id WHERE c.id = $1 FOR NO KEY UPDATE OF c",
            charge_id,
        )
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        charged, fee, refunded, user_id, developer_id, key_id = row
        if reference is not None:
            prior = await conn.fetchrow(
                "SELECT id, amount, charge_id, created_at FROM transfers WHERE kind = 'refund' AND reference = $1",
                reference,
            )
            if prior is not None:
                if prior[2] != charge_id or (amount is not None and amount != prior[1]):
                    raise IdempotencyConflict(
                        f"refund reference {reference!r} was already used for a different charge or amount"
                    )
                return Transfer(prior[0], "refund", prior[1], reference, prior[3], replayed=True)
        if amount is None:
            amount = charged - refunded
            if amount == 0:
                raise Conflict(f"charge {charge_id} is already fully refunded")
        after = await conn.fetchval(
            "UPDATE charges SET refunded = refunded + $1 WHERE id = $2 AND refunded + $1 <= amount RETURNING refunded",
            amount,
            charge_id,
        )
        if after is None:
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: only "
                f"{format_cents(charged - refunded)} of its {format_cents(charged)} cents remain refundable"
            )
        before = after - amount
        # Fee shares computed cumulatively, so partial refunds add up to exactly the fee.
        fee_share = fee * after // charged - fee * before // charged
        platform = self._system[AccountKind.PLATFORM_FEE]
        await self._lock_accounts(conn, [user_id, developer_id, platform])
        now = self._clock()
        transfer_id = "tr_" + uuid.uuid4().hex
        await self._insert_transfer(conn, transfer_id, "refund", amount, reference, user_id, charge_id, now)
        try:
            await self._post(
                conn,
                transfer_id,
                [(developer_id, -(amount - fee_share)), (platform, -fee_share), (user_id, amount)],
            )
        except _WouldGoNegative as exc:
            account = await conn.fetchrow("SELECT kind, name, balance FROM accounts WHERE id = $1", exc.account_id)
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: the {account[0]} account "
                f"{account[1]!r} holds only {format_cents(account[2])} cents (earnings already paid out)",
                hint="Refund a smaller amount or settle it outside AgentPay",
            ) from None
        if key_id is not None:
            await conn.execute("UPDATE keys SET spent = spent - $1 WHERE id = $2", amount, key_id)
        return Transfer(transfer_id, "refund", amount, reference, now)

    async def get_charge(self, charge_id: str) -> Charge:
        return await self._read(lambda conn: self._charge_by_id(conn, charge_id))

    async def list_charges(
        self,
        *,
        developer: str | None = None,
        user: str | None = None,
        servers: Sequence[str] | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Charge]:
        """Newest first, ordered by (created_at, id) so the ``before`` cursor is stable. Raises
        NotFound for an unknown developer or user, InvalidInput for a cursor outside the list."""
        _require_limit(limit)

        async def tx(conn: Conn) -> list[Charge]:
            developer_id = None if developer is None else await self._account_id(conn, AccountKind.DEVELOPER, developer)
            user_id = None if user is None else await self._account_id(conn, AccountKind.USER, user)
            scope = None if servers is None else list(servers)

            def where(scope_param: str) -> str:
                return (
                    "($1::bigint IS NULL OR c.developer_account_id = $1) "
                    "AND ($2::bigint IS NULL OR c.user_account_id = $2) "
                    f"AND ({scope_param}::text[] IS NULL OR c.call_id IN "
                    f"(SELECT call_id FROM holds WHERE server = ANY({scope_param}::text[])))"
                )

            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = await conn.fetchrow(
                    f"SELECT c.created_at, c.id FROM charges c WHERE {where('$4')} AND c.id = $3",
                    developer_id,
                    user_id,
                    before,
                    scope,
                )
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the id of the last charge of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = await conn.fetch(
                f"SELECT {_CHARGE_COLUMNS} WHERE {where('$6')} "
                "AND ($3::float8 IS NULL OR (c.created_at, c.id) < ($3, $4::text)) "
                "ORDER BY c.created_at DESC, c.id DESC LIMIT $5",
                developer_id,
                user_id,
                cursor[0],
                cursor[1],
                limit,
                scope,
            )
            return [_charge(row) for row in rows]

        return await self._read(tx)
