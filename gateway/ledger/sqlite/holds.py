"""The SQLite ledger's ``Holds`` concern: the hot path of proxied calls (hold, then capture or
void; lease renewal and the sweep of lapsed holds)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import (
    AccountKind,
    Charge,
    HoldInfo,
    HoldOutcome,
    HoldRequest,
    HoldState,
    HoldStatus,
    charge_id_for,
)
from gateway.ledger.rows import HOLD_INSERT_COLUMNS, hold_row
from gateway.ledger.rows import hold_info as _hold_info
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.sqlite.common import Conn
from gateway.ledger.sqlite.store import SqliteStore, _Rollback
from gateway.money import format_cents

_HOLD_COLUMNS = """
    h.call_id, u.name, d.name, h.server, h.method, h.name, h.amount, h.fee, h.state, h.created_at,
    h.lease_expires_at, h.charge_id
    FROM holds h
    JOIN accounts u ON u.id = h.user_account_id
    JOIN accounts d ON d.id = h.developer_account_id
"""


class SqliteHolds(SqliteStore):
    """Two-phase money movement: hold, then capture or void."""

    @staticmethod
    def _check_hold_request(req: HoldRequest) -> None:
        _require_amount(req.amount)
        if not isinstance(req.fee, int) or isinstance(req.fee, bool) or not 0 <= req.fee <= req.amount:
            raise InvalidInput(f"fee must be between 0 and the amount ({req.amount}), got {req.fee!r}")
        if not req.call_id:
            raise InvalidInput("a hold needs a call id")
        if not req.lease_s > 0:
            raise InvalidInput(f"lease must be positive, got {req.lease_s!r}")

    @staticmethod
    def _replayed_hold(conn: Conn, req: HoldRequest, user_id: int, developer_id: int) -> tuple[str, str | None] | None:
        """The (state, charge_id) of the hold already stored under ``req.call_id``, or None.
        Raises IdempotencyConflict when that hold was made for a different call."""
        row = conn.execute(
            "SELECT user_account_id, developer_account_id, server, name, amount, state, charge_id "
            "FROM holds WHERE call_id = ?",
            (req.call_id,),
        ).fetchone()
        if row is None:
            return None
        if tuple(row[:5]) != (user_id, developer_id, req.server, req.name, req.amount):
            raise IdempotencyConflict(
                f"call id {req.call_id!r} was already used for a different user, developer, server, name or amount"
            )
        return str(row[5]), row[6]

    async def hold(self, req: HoldRequest) -> HoldOutcome:
        self._check_hold_request(req)
        return await self._write(lambda conn: self._tx_hold(conn, req), durable=False, batch=("hold", req))

    def _tx_hold(self, conn: Conn, req: HoldRequest) -> HoldOutcome:
        # the user, the developer and the key's owner in one statement (the checks in this order)
        user_id, developer_id, key_owner = conn.execute(
            "SELECT (SELECT id FROM accounts WHERE kind = 'user' AND name = ?), "
            "(SELECT id FROM accounts WHERE kind = 'developer' AND name = ?), "
            "(SELECT user_account_id FROM keys WHERE id = ?)",
            (req.user, req.developer, req.key_id),
        ).fetchone()
        if user_id is None:
            raise NotFound(f"no user named {req.user!r}")
        if developer_id is None:
            raise NotFound(f"no developer named {req.developer!r}")
        if req.key_id is not None:
            if key_owner is None:
                raise NotFound(f"no key {req.key_id!r}")
            if key_owner != user_id:
                raise InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")
        now = self._clock()
        inserted = conn.execute(
            f"INSERT INTO holds ({HOLD_INSERT_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (call_id) DO NOTHING",
            hold_row(req, user_id, developer_id, now),
        ).rowcount
        if inserted != 1:
            self._replayed_hold(conn, req, user_id, developer_id)
            return HoldOutcome(
                HoldStatus.REPLAYED,
                available=self._available(conn, user_id),
                spend_remaining=self._spend_remaining(conn, req.key_id),
            )
        rows = conn.execute(
            "UPDATE accounts SET held = held + ? WHERE id = ? AND balance - held >= ? RETURNING balance - held",
            (req.amount, user_id, req.amount),
        ).fetchall()
        if not rows:
            raise _Rollback(
                HoldOutcome(
                    HoldStatus.INSUFFICIENT_FUNDS,
                    available=self._available(conn, user_id),
                    spend_remaining=self._spend_remaining(conn, req.key_id),
                )
            )
        available = int(rows[0][0])
        spend_remaining: int | None = None
        if req.key_id is not None:
            rows = conn.execute(
                "UPDATE keys SET held = held + ? WHERE id = ? "
                "AND (spend_limit IS NULL OR spent + held + ? <= spend_limit) "
                "RETURNING spend_limit - spent - held",
                (req.amount, req.key_id, req.amount),
            ).fetchall()
            if not rows:
                raise _Rollback(
                    HoldOutcome(
                        HoldStatus.SPEND_LIMIT,
                        available=available + req.amount,
                        spend_remaining=self._spend_remaining(conn, req.key_id),
                    )
                )
            spend_remaining = None if rows[0][0] is None else int(rows[0][0])
        return HoldOutcome(HoldStatus.OK, available=available, spend_remaining=spend_remaining)

    async def capture(self, call_id: str, amount: int | None = None) -> Charge:
        if amount is not None:
            _require_amount(amount, "capture amount")
        return await self._write(
            lambda conn: self._tx_capture(conn, call_id, amount), batch=("capture", (call_id, amount))
        )

    def _tx_capture(self, conn: Conn, call_id: str, amount: int | None) -> Charge:
        row = conn.execute(
            "SELECT h.key_id, h.user_account_id, h.developer_account_id, h.amount, h.fee, h.state, h.charge_id, "
            "h.server, h.method, h.name, u.name, d.name FROM holds h "
            "JOIN accounts u ON u.id = h.user_account_id JOIN accounts d ON d.id = h.developer_account_id "
            "WHERE h.call_id = ?",
            (call_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no hold for call {call_id!r}")
        key_id, user_id, developer_id, held, hold_fee, state, charge_id, server, method, name, user, developer = row
        if state == HoldState.CAPTURED:
            return replace(self._charge_by_id(conn, charge_id), replayed=True)
        if state == HoldState.VOIDED:
            raise Conflict(f"the hold for call {call_id!r} was voided; it cannot be captured")
        if amount is None:
            amount = int(held)
        if amount > held:
            raise InvalidInput(
                f"cannot capture {format_cents(amount)} cents: the hold for call {call_id!r} "
                f"reserved only {format_cents(held)}"
            )
        fee = hold_fee * amount // held
        now = self._clock()
        charge_id = charge_id_for(call_id)
        conn.execute(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
            "VALUES (?, 'charge', ?, ?, ?, ?)",
            (charge_id, amount, call_id, user_id, now),
        )
        updated = conn.execute(
            "UPDATE holds SET state = 'captured', charge_id = ?, settled_at = ? "
            "WHERE call_id = ? AND state = 'pending'",
            (charge_id, now, call_id),
        ).rowcount
        if updated != 1:
            raise Conflict(f"the hold for call {call_id!r} is no longer pending")
        if key_id is not None:
            conn.execute("UPDATE keys SET held = held - ?, spent = spent + ? WHERE id = ?", (held, amount, key_id))
        # The user's leg and the release of the hold in one update: what was held is no longer held,
        # and the amount captured (at most that) leaves the balance, so the available balance cannot
        # fall (the CHECK on accounts still guards it). The other legs go through _post's guard.
        conn.execute(
            "INSERT INTO postings (transfer_id, account_id, amount) VALUES (?, ?, ?)", (charge_id, user_id, -amount)
        )
        balance_after = int(
            conn.execute(
                "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ? RETURNING balance - held",
                (amount, held, user_id),
            ).fetchone()[0]
        )
        self._post(
            conn,
            charge_id,
            [(developer_id, amount - fee), (self._system[AccountKind.PLATFORM_FEE], fee)],
            balancing=-amount,
        )
        conn.execute(
            "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, "
            "balance_after, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (charge_id, call_id, user_id, developer_id, amount, fee, balance_after, now),
        )
        return Charge.captured(
            call_id,
            user=user,
            developer=developer,
            server=server,
            method=method,
            name=name,
            amount=amount,
            fee=fee,
            now=now,
            balance_after=balance_after,
        )

    async def void(self, call_id: str) -> bool:
        """Release a pending hold. False when it was not pending, or no such hold exists (a hold
        that was refused leaves no row, and voiding it is harmless)."""

        def tx(conn: Conn) -> bool:
            rows = conn.execute(
                "UPDATE holds SET state = 'voided', settled_at = ? WHERE call_id = ? AND state = 'pending' "
                "RETURNING user_account_id, key_id, amount",
                (self._clock(), call_id),
            ).fetchall()
            self._release(conn, rows)
            return bool(rows)

        return await self._write(tx, durable=False)

    @staticmethod
    def _release(conn: Conn, voided: Sequence[Sequence[Any]]) -> None:
        """Give back what voided holds (rows of user_account_id, key_id, amount) reserved."""
        by_account: dict[int, int] = defaultdict(int)
        by_key: dict[str, int] = defaultdict(int)
        for user_id, key_id, amount in voided:
            by_account[user_id] += amount
            if key_id is not None:
                by_key[key_id] += amount
        conn.executemany(
            "UPDATE accounts SET held = held - ? WHERE id = ?",
            [(amount, account) for account, amount in by_account.items()],
        )
        conn.executemany(
            "UPDATE keys SET held = held - ? WHERE id = ?", [(amount, key) for key, amount in by_key.items()]
        )

    async def renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        if not call_ids:
            return

        def tx(conn: Conn) -> None:
            expires = self._clock() + lease_s
            conn.executemany(
                "UPDATE holds SET lease_expires_at = ? WHERE call_id = ? AND state = 'pending'",
                [(expires, call_id) for call_id in call_ids],
            )

        await self._write(tx, durable=False)

    async def sweep(self, now: float | None = None) -> int:
        def tx(conn: Conn) -> int:
            at = self._clock() if now is None else now
            rows = conn.execute(
                "UPDATE holds SET state = 'voided', settled_at = ? "
                "WHERE state = 'pending' AND lease_expires_at < ? "
                "RETURNING user_account_id, key_id, amount",
                (at, at),
            ).fetchall()
            self._release(conn, rows)
            return len(rows)

        return await self._write(tx)

    async def get_hold(self, call_id: str) -> HoldInfo:
        def tx(conn: Conn) -> HoldInfo:
            row = conn.execute(f"SELECT {_HOLD_COLUMNS} WHERE h.call_id = ?", (call_id,)).fetchone()
            if row is None:
                raise NotFound(f"no hold for call {call_id!r}")
            return _hold_info(row)

        return await self._read(tx)
