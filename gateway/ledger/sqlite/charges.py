"""The SQLite ledger's ``Charges`` concern: one-step charges (a hold and its capture in one
transaction, hence a mixin on ``SqliteHolds``), refunds, and reading charges back."""

from __future__ import annotations

import json
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
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_limit as _require_limit
from gateway.ledger.sqlite.common import _CHARGE_COLUMNS, Conn, _WouldGoNegative
from gateway.ledger.sqlite.holds import SqliteHolds
from gateway.ledger.sqlite.store import _Rollback
from gateway.money import format_cents


class SqliteCharges(SqliteHolds):
    """One-step charges and refunds (the service API), and reading charges back."""

    async def charge(self, req: HoldRequest) -> ChargeResult:
        """Hold and capture in one transaction: either the whole charge is written or nothing."""
        self._check_hold_request(req)
        return await self._write(lambda conn: self._tx_charge(conn, req))

    def _tx_charge(self, conn: Conn, req: HoldRequest) -> ChargeResult:
        user_id = self._account_id(conn, AccountKind.USER, req.user)
        developer_id = self._account_id(conn, AccountKind.DEVELOPER, req.developer)
        prior = self._replayed_hold(conn, req, user_id, developer_id)
        if prior is not None:
            state, charge_id = prior
            if state == HoldState.CAPTURED and charge_id is not None:
                return ChargeResult(
                    HoldStatus.REPLAYED,
                    available=self._available(conn, user_id),
                    charge=self._charge_by_id(conn, charge_id),
                    spend_remaining=self._spend_remaining(conn, req.key_id),
                )
            if state == HoldState.VOIDED:
                raise Conflict(f"call {req.call_id!r} was voided; it cannot be charged")
            raise Conflict(f"call {req.call_id!r} has a pending hold; capture or release it instead of charging again")
        try:
            outcome = self._tx_hold(conn, req)
        except _Rollback as refused:
            assert isinstance(refused.result, HoldOutcome)
            raise _Rollback(
                ChargeResult(
                    refused.result.status,
                    available=refused.result.available,
                    spend_remaining=refused.result.spend_remaining,
                )
            ) from None
        if outcome.status is not HoldStatus.OK:  # a replay was ruled out above, under the same lock
            raise Conflict(f"call {req.call_id!r} could not be held ({outcome.status.value})")
        charge = self._tx_capture(conn, req.call_id, None)
        return ChargeResult(
            HoldStatus.OK,
            available=charge.balance_after,
            charge=charge,
            spend_remaining=self._spend_remaining(conn, req.key_id),
        )

    # --- refunds --------------------------------------------------------------------------------
    async def refund(self, charge_id: str, amount: int | None = None, reference: str | None = None) -> Transfer:
        """Reverse all or part of a charge: developer -share, platform_fee -fee share, user +amount.

        ``amount`` defaults to what remains refundable. Cumulative refunds never exceed the charge
        (Conflict). A repeated non-None ``reference`` returns the original refund with
        ``replayed=True``; the same reference for another charge or amount raises
        IdempotencyConflict. Raises Conflict when the developer's unpaid earnings cannot cover it.
        """
        if amount is not None:
            _require_amount(amount, "refund amount")
        return await self._write(lambda conn: self._tx_refund(conn, charge_id, amount, reference))

    def _tx_refund(self, conn: Conn, charge_id: str, amount: int | None, reference: str | None) -> Transfer:
        row = conn.execute(
            "SELECT c.amount, c.fee, c.refunded, c.user_account_id, c.developer_account_id, h.key_id "
            "FROM charges c JOIN holds h ON h.call_id = c.call_id WHERE c.id = ?",
            (charge_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        charged, fee, refunded, user_id, developer_id, key_id = row
        if reference is not None:
            prior = conn.execute(
                "SELECT id, amount, charge_id, created_at FROM transfers WHERE kind = 'refund' AND reference = ?",
                (reference,),
            ).fetchone()
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
        rows = conn.execute(
            "UPDATE charges SET refunded = refunded + ? WHERE id = ? AND refunded + ? <= amount RETURNING refunded",
            (amount, charge_id, amount),
        ).fetchall()
        if not rows:
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: only "
                f"{format_cents(charged - refunded)} of its {format_cents(charged)} cents remain refundable"
            )
        after = int(rows[0][0])
        before = after - amount
        # Fee shares computed cumulatively, so partial refunds add up to exactly the fee.
        fee_share = fee * after // charged - fee * before // charged
        now = self._clock()
        transfer_id = "tr_" + uuid.uuid4().hex
        conn.execute(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, charge_id, created_at) "
            "VALUES (?, 'refund', ?, ?, ?, ?, ?)",
            (transfer_id, amount, reference, user_id, charge_id, now),
        )
        try:
            self._post(
                conn,
                transfer_id,
                [
                    (developer_id, -(amount - fee_share)),
                    (self._system[AccountKind.PLATFORM_FEE], -fee_share),
                    (user_id, amount),
                ],
            )
        except _WouldGoNegative as exc:
            kind, name, balance = conn.execute(
                "SELECT kind, name, balance FROM accounts WHERE id = ?", (exc.account_id,)
            ).fetchone()
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: the {kind} account "
                f"{name!r} holds only {format_cents(balance)} cents (earnings already paid out)",
                hint="Refund a smaller amount or settle it outside AgentPay",
            ) from None
        if key_id is not None:
            conn.execute("UPDATE keys SET spent = spent - ? WHERE id = ?", (amount, key_id))
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

        def tx(conn: Conn) -> list[Charge]:
            developer_id = None if developer is None else self._account_id(conn, AccountKind.DEVELOPER, developer)
            user_id = None if user is None else self._account_id(conn, AccountKind.USER, user)
            scope = None if servers is None else json.dumps(list(servers))
            where = (
                "(?1 IS NULL OR c.developer_account_id = ?1) AND (?2 IS NULL OR c.user_account_id = ?2) "
                "AND (?6 IS NULL OR c.call_id IN "
                "(SELECT call_id FROM holds WHERE server IN (SELECT value FROM json_each(?6))))"
            )
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = conn.execute(
                    f"SELECT c.created_at, c.id FROM charges c WHERE {where} AND c.id = ?3",
                    (developer_id, user_id, before, None, None, scope),
                ).fetchone()
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the id of the last charge of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = conn.execute(
                f"SELECT {_CHARGE_COLUMNS} WHERE {where} AND (?3 IS NULL OR (c.created_at, c.id) < (?3, ?4)) "
                "ORDER BY c.created_at DESC, c.id DESC LIMIT ?5",
                (developer_id, user_id, cursor[0], cursor[1], limit, scope),
            ).fetchall()
            return [_charge(row) for row in rows]

        return await self._read(tx)
