"""Holds, captures, voids and lease renewals as transactions of their own (``_single_*``), and the
steps they are made of: checking a hold request and resolving its parties, inserting the hold or
finding the one it replays, the guarded reservation (``_reserve``), the capture (``_tx_capture``),
giving back what voided holds reserved (``_release``).

A batch that a database error nobody foresaw rolled back runs its operations this way
(``batching``); the one-step charge (``charges``) is made of these steps, and the sweep (``holds``)
releases through ``_release``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, Charge, HoldOutcome, HoldRequest, HoldState, HoldStatus, charge_id_for
from gateway.ledger.postgres.common import _CHARGE_COLUMNS, Conn, Row, _Rollback
from gateway.ledger.postgres.store import PostgresStore
from gateway.ledger.rows import HOLD_INSERT_COLUMNS, hold_row
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import require_amount as _require_amount
from gateway.money import format_cents


class PostgresSingle(PostgresStore):
    """Holds, captures, voids and renewals one transaction each, and the steps the one-step charge
    shares with them."""

    @staticmethod
    def _check_hold_request(req: HoldRequest) -> None:
        _require_amount(req.amount)
        if not isinstance(req.fee, int) or isinstance(req.fee, bool) or not 0 <= req.fee <= req.amount:
            raise InvalidInput(f"fee must be between 0 and the amount ({req.amount}), got {req.fee!r}")
        if not req.call_id:
            raise InvalidInput("a hold needs a call id")
        if not req.lease_s > 0:
            raise InvalidInput(f"lease must be positive, got {req.lease_s!r}")

    async def _parties(self, conn: Conn, req: HoldRequest) -> tuple[int, int]:
        """The user and developer account ids of a hold request (and check its key)."""
        row = await conn.fetchrow(
            "SELECT (SELECT id FROM accounts WHERE kind = 'user' AND name = $1), "
            "(SELECT id FROM accounts WHERE kind = 'developer' AND name = $2), "
            "(SELECT user_account_id FROM keys WHERE id = $3::text)",
            req.user,
            req.developer,
            req.key_id,
        )
        return self._check_parties(req, row)

    @staticmethod
    def _check_parties(req: HoldRequest, row: Sequence[Any]) -> tuple[int, int]:
        """(user id, developer id) from a row of (user id, developer id, key owner) looked up for ``req``."""
        user_id, developer_id, key_owner = row[0], row[1], row[2]
        if user_id is None:
            raise NotFound(f"no user named {req.user!r}")
        if developer_id is None:
            raise NotFound(f"no developer named {req.developer!r}")
        if req.key_id is not None:
            if key_owner is None:
                raise NotFound(f"no key {req.key_id!r}")
            if key_owner != user_id:
                raise InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")
        return int(user_id), int(developer_id)

    async def _insert_hold(self, conn: Conn, req: HoldRequest, user_id: int, developer_id: int, now: float) -> bool:
        """Insert the hold row; False when a hold with this call id already exists."""
        inserted = await conn.fetchval(
            f"INSERT INTO holds ({HOLD_INSERT_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
            "ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
            *hold_row(req, user_id, developer_id, now),
        )
        return inserted is not None

    @staticmethod
    async def _existing_hold(conn: Conn, req: HoldRequest, user_id: int, developer_id: int) -> Row:
        """The stored hold with ``req.call_id``, after checking that ``req`` is the same call."""
        row = await conn.fetchrow(
            "SELECT user_account_id, developer_account_id, server, name, amount, state, charge_id "
            "FROM holds WHERE call_id = $1",
            req.call_id,
        )
        assert row is not None  # the insert conflicted with it and holds are never deleted
        if (row[0], row[1], row[2], row[3], row[4]) != (user_id, developer_id, req.server, req.name, req.amount):
            raise IdempotencyConflict(
                f"call id {req.call_id!r} was already used for a different user, developer, server, name or amount"
            )
        return row

    async def _reserve(self, conn: Conn, req: HoldRequest, user_id: int) -> HoldOutcome:
        """The guarded reservation: raises ``_Rollback`` with the refusal when it does not fit."""
        available = await conn.fetchval(
            "UPDATE accounts SET held = held + $1 WHERE id = $2 AND balance - held >= $1 RETURNING balance - held",
            req.amount,
            user_id,
        )
        if available is None:
            raise _Rollback(
                HoldOutcome(
                    HoldStatus.INSUFFICIENT_FUNDS,
                    available=await self._available(conn, user_id),
                    spend_remaining=await self._spend_remaining(conn, req.key_id),
                )
            )
        spend_remaining: int | None = None
        if req.key_id is not None:
            row = await conn.fetchrow(
                "UPDATE keys SET held = held + $1 WHERE id = $2 "
                "AND (spend_limit IS NULL OR spent + held + $1 <= spend_limit) "
                "RETURNING spend_limit - spent - held",
                req.amount,
                req.key_id,
            )
            if row is None:
                raise _Rollback(
                    HoldOutcome(
                        HoldStatus.SPEND_LIMIT,
                        available=int(available) + req.amount,
                        spend_remaining=await self._spend_remaining(conn, req.key_id),
                    )
                )
            spend_remaining = None if row[0] is None else int(row[0])
        return HoldOutcome(HoldStatus.OK, available=int(available), spend_remaining=spend_remaining)

    async def _single_hold(self, req: HoldRequest) -> HoldOutcome:
        """``hold`` as a transaction of its own (when a batch has to be split up)."""

        async def tx(conn: Conn) -> HoldOutcome:
            user_id, developer_id = await self._parties(conn, req)
            if not await self._insert_hold(conn, req, user_id, developer_id, self._clock()):
                await self._existing_hold(conn, req, user_id, developer_id)
                return HoldOutcome(
                    HoldStatus.REPLAYED,
                    available=await self._available(conn, user_id),
                    spend_remaining=await self._spend_remaining(conn, req.key_id),
                )
            return await self._reserve(conn, req, user_id)

        return await self._run(tx, idempotent=True)

    async def _single_capture(self, call_id: str, amount: int | None) -> Charge:
        async def tx(conn: Conn) -> Charge:
            return await self._tx_capture(conn, call_id, amount)

        return await self._run(tx, idempotent=True, settle=True)

    async def _tx_capture(self, conn: Conn, call_id: str, amount: int | None) -> Charge:
        row = await conn.fetchrow(
            "SELECT h.key_id, h.user_account_id, h.developer_account_id, h.amount, h.fee, h.state, h.charge_id, "
            "u.name, d.name, h.server, h.method, h.name "
            "FROM holds h JOIN accounts u ON u.id = h.user_account_id JOIN accounts d ON d.id = h.developer_account_id "
            "WHERE h.call_id = $1 FOR NO KEY UPDATE OF h",
            call_id,
        )
        if row is None:
            raise NotFound(f"no hold for call {call_id!r}")
        key_id, user_id, developer_id, held, hold_fee, state, charge_id = row[:7]
        if state == HoldState.CAPTURED:
            return replace(await self._charge_by_id(conn, charge_id), replayed=True)
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
        platform = self._system[AccountKind.PLATFORM_FEE]
        await self._lock_accounts(conn, [user_id, developer_id, platform])
        now = self._clock()
        charge_id = charge_id_for(call_id)  # unique: the hold row is locked and pending
        await self._insert_transfer(conn, charge_id, "charge", amount, call_id, user_id, None, now)
        await conn.execute(
            "UPDATE holds SET state = 'captured', charge_id = $1, settled_at = $2 "
            "WHERE call_id = $3 AND state = 'pending'",
            charge_id,
            now,
            call_id,
        )
        await conn.execute("UPDATE accounts SET held = held - $1 WHERE id = $2", held, user_id)
        if key_id is not None:
            await conn.execute(
                "UPDATE keys SET held = held - $1, spent = spent + $2 WHERE id = $3", held, amount, key_id
            )
        # The user's leg needs no guard: the hold was released just above, so the available balance
        # cannot fall (it may be below zero already, after a clawback: the capture still stands).
        await self._post(
            conn, charge_id, [(user_id, -amount), (developer_id, amount - fee), (platform, fee)], unguarded=(user_id,)
        )
        balance_after = await self._available(conn, user_id)
        await conn.execute(
            "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, "
            "balance_after, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            charge_id,
            call_id,
            user_id,
            developer_id,
            amount,
            fee,
            balance_after,
            now,
        )
        return Charge.captured(
            call_id,
            user=row[7],
            developer=row[8],
            server=row[9],
            method=row[10],
            name=row[11],
            amount=amount,
            fee=fee,
            now=now,
            balance_after=balance_after,
        )

    async def _single_void(self, call_id: str) -> bool:
        async def tx(conn: Conn) -> bool:
            rows = await conn.fetch(
                "UPDATE holds SET state = 'voided', settled_at = $1 WHERE call_id = $2 AND state = 'pending' "
                "RETURNING user_account_id, key_id, amount",
                self._clock(),
                call_id,
            )
            await self._release(conn, rows)
            return bool(rows)

        return await self._run(tx, idempotent=True, settle=True)

    async def _release(self, conn: Conn, voided: Sequence[Row]) -> None:
        """Give back what voided holds (rows of user_account_id, key_id, amount) reserved,
        locking accounts and then keys in id order."""
        by_account: dict[int, int] = defaultdict(int)
        by_key: dict[str, int] = defaultdict(int)
        for user_id, key_id, amount in voided:
            by_account[user_id] += amount
            if key_id is not None:
                by_key[key_id] += amount
        for account in sorted(by_account):
            await conn.execute("UPDATE accounts SET held = held - $1 WHERE id = $2", by_account[account], account)
        for key in sorted(by_key):
            await conn.execute("UPDATE keys SET held = held - $1 WHERE id = $2", by_key[key], key)

    async def _single_renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        async def tx(conn: Conn) -> None:
            await conn.execute(
                "WITH claimed AS (SELECT call_id FROM holds WHERE call_id = ANY($2::text[]) AND state = 'pending' "
                "ORDER BY call_id FOR NO KEY UPDATE) "
                "UPDATE holds h SET lease_expires_at = $1 FROM claimed "
                "WHERE h.call_id = claimed.call_id AND h.state = 'pending'",
                self._clock() + lease_s,
                list(call_ids),
            )

        await self._run(tx, idempotent=True)

    @staticmethod
    async def _available(conn: Conn, account_id: int) -> int:
        return int(await conn.fetchval("SELECT balance - held FROM accounts WHERE id = $1", account_id))

    @staticmethod
    async def _spend_remaining(conn: Conn, key_id: str | None) -> int | None:
        if key_id is None:
            return None
        value = await conn.fetchval("SELECT spend_limit - spent - held FROM keys WHERE id = $1", key_id)
        return None if value is None else int(value)

    @staticmethod
    async def _charge_by_id(conn: Conn, charge_id: str) -> Charge:
        row = await conn.fetchrow(f"SELECT {_CHARGE_COLUMNS} WHERE c.id = $1", charge_id)
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        return _charge(row)
