"""The PostgreSQL ledger's ``Holds`` concern: the hot path of proxied calls (hold, then capture or
void; lease renewal, the sweep of lapsed holds, reading a hold back). Holds, captures, voids and
renewals are committed in groups (``batching``).
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import NotFound
from gateway.ledger.base import Charge, HoldInfo, HoldOutcome, HoldRequest
from gateway.ledger.postgres.batching import PostgresBatching
from gateway.ledger.postgres.common import Conn, _CaptureOp, _HoldOp, _RenewOp, _VoidOp
from gateway.ledger.rows import hold_info as _hold_info
from gateway.ledger.rows import require_amount as _require_amount

_HOLD_COLUMNS = """
    h.call_id, u.name, d.name, h.server, h.method, h.name, h.amount, h.fee, h.state, h.created_at,
    h.lease_expires_at, h.charge_id
    FROM holds h
    JOIN accounts u ON u.id = h.user_account_id
    JOIN accounts d ON d.id = h.developer_account_id
"""


class PostgresHolds(PostgresBatching):
    """Two-phase money movement: hold, then capture or void; leases and the sweep."""

    SWEEP_BATCH = 500  # holds voided per sweep transaction

    async def hold(self, req: HoldRequest) -> HoldOutcome:
        self._check_hold_request(req)
        outcome: HoldOutcome = await self._submit(_HoldOp(req, self._future()))
        return outcome

    async def capture(self, call_id: str, amount: int | None = None) -> Charge:
        if amount is not None:
            _require_amount(amount, "capture amount")
        charge: Charge = await self._submit(_CaptureOp(call_id, amount, self._future()))
        return charge

    async def void(self, call_id: str) -> bool:
        """Release a pending hold. False when it was not pending, or no such hold exists."""
        released: bool = await self._submit(_VoidOp(call_id, self._future()))
        return released

    async def renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        if not call_ids:
            return
        await self._submit(_RenewOp(tuple(call_ids), lease_s, self._future()))

    async def sweep(self, now: float | None = None) -> int:
        at = self._clock() if now is None else now
        batch = self.SWEEP_BATCH

        async def tx(conn: Conn) -> int:
            # SKIP LOCKED: a hold another sweeper (or a capture) has locked is theirs to settle.
            rows = await conn.fetch(
                "WITH lapsed AS (SELECT call_id FROM holds WHERE state = 'pending' AND lease_expires_at < $1 "
                "ORDER BY call_id LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED) "
                "UPDATE holds h SET state = 'voided', settled_at = $1 FROM lapsed "
                "WHERE h.call_id = lapsed.call_id AND h.state = 'pending' "
                "RETURNING h.user_account_id, h.key_id, h.amount",
                float(at),
                batch,
            )
            await self._release(conn, rows)
            return len(rows)

        total = 0
        while True:
            swept = await self._run(tx, idempotent=True)
            total += swept
            if swept < batch:
                return total

    async def get_hold(self, call_id: str) -> HoldInfo:
        async def tx(conn: Conn) -> HoldInfo:
            row = await conn.fetchrow(f"SELECT {_HOLD_COLUMNS} WHERE h.call_id = $1", call_id)
            if row is None:
                raise NotFound(f"no hold for call {call_id!r}")
            return _hold_info(row)

        return await self._read(tx)
