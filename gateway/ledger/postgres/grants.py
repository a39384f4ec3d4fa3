"""The PostgreSQL ledger's ``Grants`` concern: credit grants (``gateway.ledger.grants``), a hold row
of several calls' worth that a process spends in memory and flushes in batches.

Each operation is one READ COMMITTED transaction that locks, in the one global order, the grant's
hold row, then the accounts (ascending id), then the key, and decides with what it read under those
locks: concurrent holds, captures, refunds and top-ups of the same user wait for it or it for them.
A flush writes its calls with one statement per table (``unnest``), whatever their number.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.errors import IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, HoldState
from gateway.ledger.grants import (
    GRANT_METHOD,
    GrantedCall,
    GrantFlush,
    GrantRequest,
    GrantState,
    GrantStatus,
    check_flush,
    check_grant_request,
    grant_size,
    plan_flush,
)
from gateway.ledger.postgres.common import Conn
from gateway.ledger.postgres.store import PostgresStore


def _cap(limit: int | None, spent: int, held: int) -> int | None:
    return None if limit is None else int(limit) - int(spent) - int(held)


class PostgresGrants(PostgresStore):
    """Credit grants: open or top up, flush captured calls, refresh leases, sum what is outstanding."""

    async def grant(self, req: GrantRequest) -> GrantState:
        check_grant_request(req)

        async def tx(conn: Conn) -> GrantState:
            return await self._tx_grant(conn, req)

        return await self._run(tx, idempotent=True)

    async def _tx_grant(self, conn: Conn, req: GrantRequest) -> GrantState:
        now = self._clock()
        user_id, developer_id = await conn.fetchrow(
            "SELECT (SELECT id FROM accounts WHERE kind = 'user' AND name = $1), "
            "(SELECT id FROM accounts WHERE kind = 'developer' AND name = $2)",
            req.user,
            req.developer,
        )
        if user_id is None:
            raise NotFound(f"no user named {req.user!r}")
        if developer_id is None:
            raise NotFound(f"no developer named {req.developer!r}")
        existing = await conn.fetchrow(
            "SELECT user_account_id, key_id, method, state, amount FROM holds WHERE call_id = $1 FOR NO KEY UPDATE",
            req.grant_id,
        )
        available = int(
            await conn.fetchval("SELECT balance - held FROM accounts WHERE id = $1 FOR NO KEY UPDATE", user_id)
        )
        key = await conn.fetchrow(
            "SELECT user_account_id, spend_limit, spent, held, revoked_at, expires_at FROM keys WHERE id = $1 "
            "FOR NO KEY UPDATE",
            req.key_id,
        )
        if key is None:
            raise NotFound(f"no key {req.key_id!r}")
        if key[0] != user_id:
            raise InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")
        cap = _cap(key[1], key[2], key[3])
        current = 0
        if existing is not None:
            if (existing[0], existing[1], existing[2]) != (user_id, req.key_id, GRANT_METHOD):
                raise IdempotencyConflict(f"id {req.grant_id!r} names a hold that is not a grant of key {req.key_id}")
            if existing[3] != HoldState.PENDING:
                return GrantState(GrantStatus.CLOSED, 0, available, cap)
            current = int(existing[4])
        if key[4] is not None or (key[5] is not None and key[5] <= now):
            return GrantState(GrantStatus.REVOKED, current, available, cap)
        size = grant_size(req, available, cap)
        if size == 0:
            return GrantState(GrantStatus.TOO_LOW, current, available, cap)
        await conn.execute("UPDATE accounts SET held = held + $1 WHERE id = $2", size, user_id)
        await conn.execute("UPDATE keys SET held = held + $1 WHERE id = $2", size, req.key_id)
        if existing is None:
            await conn.execute(
                "INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, "
                "amount, fee, owner, created_at, lease_expires_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $2, $7, 0, $8, $9, $10)",
                req.grant_id,
                req.key_id,
                user_id,
                developer_id,
                req.server,
                GRANT_METHOD,
                size,
                req.owner,
                now,
                now + req.lease_s,
            )
        else:
            await conn.execute(
                "UPDATE holds SET amount = amount + $1, lease_expires_at = $2 WHERE call_id = $3",
                size,
                now + req.lease_s,
                req.grant_id,
            )
        return GrantState(
            GrantStatus.OK, current + size, available - size, None if cap is None else cap - size, granted=size
        )

    async def flush_grant(self, grant_id: str, calls: Sequence[GrantedCall], *, release: int | None = 0) -> GrantFlush:
        check_flush(calls, release)

        async def tx(conn: Conn) -> GrantFlush:
            return await self._tx_flush(conn, grant_id, calls, release)

        return await self._run(tx, idempotent=True, settle=True)

    async def _tx_flush(
        self, conn: Conn, grant_id: str, calls: Sequence[GrantedCall], release: int | None
    ) -> GrantFlush:
        """Three round trips whatever the batch: lock the grant's row (and read the key, the calls
        already charged and the developers' ids with it), lock the accounts in id order, write."""
        now = self._clock()
        grant = await conn.fetchrow(
            "SELECT h.user_account_id, h.key_id, h.amount, h.state, h.method, h.owner, k.spend_limit, k.spent, "
            "k.held, ARRAY(SELECT call_id FROM holds WHERE call_id = ANY($2::text[])), "
            "ARRAY(SELECT name FROM accounts WHERE kind = 'developer' AND name = ANY($3::text[]) ORDER BY name), "
            "ARRAY(SELECT id FROM accounts WHERE kind = 'developer' AND name = ANY($3::text[]) ORDER BY name) "
            "FROM holds h LEFT JOIN keys k ON k.id = h.key_id WHERE h.call_id = $1 FOR NO KEY UPDATE OF h",
            grant_id,
            [c.call_id for c in calls],
            sorted({c.developer for c in calls}),
        )
        if grant is None:
            raise NotFound(f"no grant {grant_id!r}")
        user_id, key_id, amount, state, method, owner, limit, spent, key_held, done, names, dev_ids = grant
        if method != GRANT_METHOD:
            raise InvalidInput(f"{grant_id!r} is a call's hold, not a grant")
        developers = {str(name): int(i) for name, i in zip(names, dev_ids, strict=True)}
        platform = self._system[AccountKind.PLATFORM_FEE]
        locked = await self._lock_accounts(conn, [user_id, platform, *developers.values()])
        user = locked[user_id]
        pending = state == HoldState.PENDING
        plan = plan_flush(
            calls,
            set(done),
            pending=pending,
            amount=int(amount),
            available=int(user["balance"]) - int(user["held"]),
            cap=None if spent is None else _cap(limit, spent, key_held),
            release=release,
        )
        ids, amounts, call_ids, developer_ids, servers, methods, call_names = [], [], [], [], [], [], []
        helds, hold_fees, fees, afters = [], [], [], []
        p_transfer, p_account, p_amount = [], [], []
        deltas: dict[int, int] = {user_id: -plan.total}
        for call, fee, charge_id, balance_after in plan.charged:
            developer_id = developers.get(call.developer)
            if developer_id is None:
                raise NotFound(f"no developer named {call.developer!r}")
            take = call.amount
            ids.append(charge_id)
            amounts.append(take)
            call_ids.append(call.call_id)
            developer_ids.append(developer_id)
            servers.append(call.server)
            methods.append(call.method)
            call_names.append(call.name)
            helds.append(call.held)
            hold_fees.append(call.fee)
            fees.append(fee)
            afters.append(balance_after)
            for account, leg in ((user_id, -take), (developer_id, take - fee), (platform, fee)):
                if leg:
                    p_transfer.append(charge_id)
                    p_account.append(account)
                    p_amount.append(leg)
                    if account != user_id:
                        deltas[account] = deltas.get(account, 0) + leg
        released = plan.from_grant + plan.given_back
        accounts = sorted(deltas)
        # One statement: its CTEs see one snapshot and the foreign keys are checked at its end.
        await conn.execute(
            "WITH t AS (INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
            "  SELECT i, 'charge', a, c, $1, $2 FROM unnest($3::text[], $4::bigint[], $5::text[]) AS x (i, a, c)), "
            "h AS (INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, "
            "  amount, fee, owner, created_at, lease_expires_at, settled_at, state, charge_id) "
            "  SELECT c, $6, $1, d, s, m, n, hh, f, $7, $2, $2, $2, 'captured', i FROM unnest($5::text[], "
            "  $8::bigint[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::bigint[], $3::text[]) "
            "  AS x (c, d, s, m, n, hh, f, i)), "
            "p AS (INSERT INTO postings (transfer_id, account_id, amount) "
            "  SELECT * FROM unnest($14::text[], $15::bigint[], $16::bigint[])), "
            "ch AS (INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, "
            "  balance_after, created_at) SELECT i, c, $1, d, a, f, b, $2 FROM unnest($3::text[], $5::text[], "
            "  $8::bigint[], $4::bigint[], $17::bigint[], $18::bigint[]) AS x (i, c, d, a, f, b)), "
            "g AS (UPDATE holds SET amount = CASE WHEN $19::bigint = 0 THEN amount ELSE $19::bigint END, "
            "  state = CASE WHEN $19::bigint = 0 THEN 'voided' ELSE state END, "
            "  settled_at = CASE WHEN $19::bigint = 0 THEN $2 ELSE settled_at END "
            "  WHERE call_id = $20 AND state = 'pending'), "
            "k AS (UPDATE keys SET held = held - $21, spent = spent + $22 WHERE id = $6 AND ($21 <> 0 OR $22 <> 0)) "
            "UPDATE accounts a SET balance = a.balance + x.delta, held = a.held - CASE WHEN a.id = $1 THEN $21 "
            "  ELSE 0 END FROM unnest($23::bigint[], $24::bigint[]) AS x (id, delta) "
            "WHERE a.id = x.id AND (x.delta <> 0 OR (a.id = $1 AND $21 <> 0))",
            user_id,
            now,
            ids,
            amounts,
            call_ids,
            key_id,
            owner,
            developer_ids,
            servers,
            methods,
            call_names,
            helds,
            hold_fees,
            p_transfer,
            p_account,
            p_amount,
            fees,
            afters,
            plan.left,
            grant_id,
            released,
            plan.total,
            accounts,
            [deltas[a] for a in accounts],
        )
        status = GrantStatus.OK if pending and plan.left else GrantStatus.CLOSED
        return GrantFlush(
            GrantState(status, plan.left, plan.available, plan.cap),
            captured=len(plan.charged),
            replayed=plan.replayed,
            unbilled=tuple(plan.unbilled),
        )

    async def refresh_grants(self, grant_ids: Sequence[str], lease_s: float) -> dict[str, GrantState]:
        if not grant_ids:
            return {}

        async def tx(conn: Conn) -> dict[str, GrantState]:
            now = self._clock()
            await conn.execute(
                "WITH claimed AS (SELECT call_id FROM holds WHERE call_id = ANY($2::text[]) AND state = 'pending' "
                "AND method = $3 ORDER BY call_id FOR NO KEY UPDATE) "
                "UPDATE holds h SET lease_expires_at = $1 FROM claimed WHERE h.call_id = claimed.call_id",
                now + lease_s,
                list(grant_ids),
                GRANT_METHOD,
            )
            rows = await conn.fetch(
                "SELECT h.call_id, h.amount, h.state, k.spend_limit, k.spent, k.held, k.revoked_at, k.expires_at, "
                "a.balance - a.held FROM holds h JOIN accounts a ON a.id = h.user_account_id "
                "LEFT JOIN keys k ON k.id = h.key_id WHERE h.call_id = ANY($1::text[]) AND h.method = $2",
                list(grant_ids),
                GRANT_METHOD,
            )
            states: dict[str, GrantState] = {}
            for grant_id, amount, state, limit, spent, key_held, revoked_at, expires_at, available in rows:
                cap = None if spent is None else _cap(limit, spent, key_held)
                if state != HoldState.PENDING:
                    status, amount = GrantStatus.CLOSED, 0
                elif revoked_at is not None or (expires_at is not None and expires_at <= now):
                    status = GrantStatus.REVOKED
                else:
                    status = GrantStatus.OK
                states[grant_id] = GrantState(status, int(amount), int(available), cap)
            return states

        return await self._run(tx, idempotent=True)

    async def grants_outstanding(self, user: str, key_id: str | None = None) -> int:
        async def tx(conn: Conn) -> int:
            value = await conn.fetchval(
                "SELECT COALESCE(SUM(h.amount), 0) FROM holds h JOIN accounts a ON a.id = h.user_account_id "
                "WHERE h.state = 'pending' AND h.method = $1 AND a.kind = 'user' AND a.name = $2 "
                "AND ($3::text IS NULL OR h.key_id = $3::text)",
                GRANT_METHOD,
                user,
                key_id,
            )
            return int(value)

        return await self._read(tx)
