"""The SQLite ledger's ``Grants`` concern: credit grants (``gateway.ledger.grants``), a hold row of
several calls' worth that a process spends in memory and flushes in batches. Every operation is one
function on the writer thread inside its group's ``BEGIN IMMEDIATE`` transaction, so what it reads
cannot change under it, even with other processes on the same file."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

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
from gateway.ledger.sqlite.batch import _select_in
from gateway.ledger.sqlite.common import Conn
from gateway.ledger.sqlite.store import SqliteStore

_GRANT_ROW = (
    "SELECT h.user_account_id, h.key_id, h.amount, h.state, h.method, h.owner, k.spend_limit, k.spent, k.held, "
    "k.revoked_at, k.expires_at, a.balance - a.held FROM holds h JOIN accounts a ON a.id = h.user_account_id "
    "LEFT JOIN keys k ON k.id = h.key_id WHERE h.call_id = ?"
)


def _json(rows: Sequence[Any]) -> str:
    """``rows`` as JSON text (SQLite's JSON functions refuse a BLOB)."""
    return orjson.dumps(rows).decode()


# A flush's rows, one statement per table over a JSON array of rows (``json_each`` yields them in
# array order; ``$[i]`` is the row's i-th value, integers as INTEGER and strings as TEXT).
_INSERT_TRANSFERS = (
    "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
    "SELECT json_extract(value, '$[0]'), 'charge', json_extract(value, '$[1]'), json_extract(value, '$[2]'), ?1, ?2 "
    "FROM json_each(?3)"
)
_INSERT_HOLDS = (
    "INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, "
    "fee, owner, created_at, lease_expires_at, settled_at, state, charge_id) "
    "SELECT json_extract(value, '$[0]'), ?1, ?2, json_extract(value, '$[1]'), json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), "
    "json_extract(value, '$[6]'), ?3, ?4, ?4, ?4, 'captured', json_extract(value, '$[7]') FROM json_each(?5)"
)
_INSERT_POSTINGS = (
    "INSERT INTO postings (transfer_id, account_id, amount) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]') FROM json_each(?1)"
)
_INSERT_CHARGES = (
    "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, balance_after, created_at) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), ?1, json_extract(value, '$[2]'), "
    "json_extract(value, '$[3]'), json_extract(value, '$[4]'), json_extract(value, '$[5]'), ?2 FROM json_each(?3)"
)


class SqliteGrants(SqliteStore):
    """Credit grants: open or top up, flush captured calls, refresh leases, sum what is outstanding."""

    async def grant(self, req: GrantRequest) -> GrantState:
        check_grant_request(req)
        return await self._write(lambda conn: self._tx_grant(conn, req), durable=False)

    def _tx_grant(self, conn: Conn, req: GrantRequest) -> GrantState:
        now = self._clock()
        row = conn.execute(
            "SELECT (SELECT id FROM accounts WHERE kind = 'user' AND name = ?), "
            "(SELECT id FROM accounts WHERE kind = 'developer' AND name = ?)",
            (req.user, req.developer),
        ).fetchone()
        user_id, developer_id = row
        if user_id is None:
            raise NotFound(f"no user named {req.user!r}")
        if developer_id is None:
            raise NotFound(f"no developer named {req.developer!r}")
        key = conn.execute(
            "SELECT user_account_id, spend_limit, spent, held, revoked_at, expires_at FROM keys WHERE id = ?",
            (req.key_id,),
        ).fetchone()
        if key is None:
            raise NotFound(f"no key {req.key_id!r}")
        key_owner, limit, spent, key_held, revoked_at, expires_at = key
        if key_owner != user_id:
            raise InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")
        available = self._available(conn, user_id)
        remaining_cap = None if limit is None else int(limit) - int(spent) - int(key_held)
        existing = conn.execute(
            "SELECT user_account_id, key_id, method, state, amount FROM holds WHERE call_id = ?", (req.grant_id,)
        ).fetchone()
        current = 0
        if existing is not None:
            if (existing[0], existing[1], existing[2]) != (user_id, req.key_id, GRANT_METHOD):
                raise IdempotencyConflict(f"id {req.grant_id!r} names a hold that is not a grant of key {req.key_id}")
            if existing[3] != HoldState.PENDING:
                return GrantState(GrantStatus.CLOSED, 0, available, remaining_cap)
            current = int(existing[4])
        if revoked_at is not None or (expires_at is not None and expires_at <= now):
            return GrantState(GrantStatus.REVOKED, current, available, remaining_cap)
        size = grant_size(req, available, remaining_cap)
        if size == 0:
            return GrantState(GrantStatus.TOO_LOW, current, available, remaining_cap)
        # Guarded exactly as a hold is (the sizes above were read in this same transaction).
        updated = conn.execute(
            "UPDATE accounts SET held = held + ? WHERE id = ? AND balance - held >= ?", (size, user_id, size)
        ).rowcount
        keys = conn.execute(
            "UPDATE keys SET held = held + ? WHERE id = ? AND (spend_limit IS NULL OR spent + held + ? <= spend_limit)",
            (size, req.key_id, size),
        ).rowcount
        if updated != 1 or keys != 1:
            raise AssertionError("a grant sized inside its transaction no longer fits")
        if existing is None:
            conn.execute(
                "INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, "
                "amount, fee, owner, created_at, lease_expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (
                    req.grant_id,
                    req.key_id,
                    user_id,
                    developer_id,
                    req.server,
                    GRANT_METHOD,
                    req.key_id,
                    size,
                    req.owner,
                    now,
                    now + req.lease_s,
                ),
            )
        else:
            conn.execute(
                "UPDATE holds SET amount = amount + ?, lease_expires_at = ? WHERE call_id = ?",
                (size, now + req.lease_s, req.grant_id),
            )
        return GrantState(
            GrantStatus.OK,
            current + size,
            available - size,
            None if remaining_cap is None else remaining_cap - size,
            granted=size,
        )

    async def flush_grant(self, grant_id: str, calls: Sequence[GrantedCall], *, release: int | None = 0) -> GrantFlush:
        check_flush(calls, release)
        return await self._write(lambda conn: self._tx_flush(conn, grant_id, calls, release))

    def _tx_flush(self, conn: Conn, grant_id: str, calls: Sequence[GrantedCall], release: int | None) -> GrantFlush:
        now = self._clock()
        row = conn.execute(_GRANT_ROW, (grant_id,)).fetchone()
        if row is None:
            raise NotFound(f"no grant {grant_id!r}")
        user_id, key_id, amount, state, method, owner, limit, spent, key_held, _, _, available = row
        if method != GRANT_METHOD:
            raise InvalidInput(f"{grant_id!r} is a call's hold, not a grant")
        pending = state == HoldState.PENDING
        done = {
            r[0]
            for r in conn.execute(
                "SELECT call_id FROM holds WHERE call_id IN (SELECT value FROM json_each(?))",
                (_json([c.call_id for c in calls]),),
            )
        }
        plan = plan_flush(
            calls,
            done,
            pending=pending,
            amount=int(amount),
            available=int(available),
            cap=None if limit is None else int(limit) - int(spent) - int(key_held),
            release=release,
        )
        developers = {
            r[1]: int(r[0])
            for r in _select_in(
                conn,
                "SELECT id, name FROM accounts WHERE kind = 'developer' AND name IN ({})",
                [c.developer for c, _, _, _ in plan.charged],
            )
        }
        platform = self._system[AccountKind.PLATFORM_FEE]
        # One row list per table, written with ONE statement per table over a JSON array (``json_each``)
        # instead of one ``executemany`` step per row: the writer thread then releases the GIL once per
        # table rather than once per row, so a batch of thousands of calls does not fight the event loop
        # for the GIL thousands of times. The rows written are exactly those a capture writes.
        transfers: list[tuple[str, int, str]] = []
        holds: list[tuple[Any, ...]] = []
        postings: list[tuple[str, int, int]] = []
        charges: list[tuple[Any, ...]] = []
        credits: dict[int, int] = {}
        for call, fee, charge_id, balance_after in plan.charged:
            developer_id = developers.get(call.developer)
            if developer_id is None:
                raise NotFound(f"no developer named {call.developer!r}")
            take = call.amount
            transfers.append((charge_id, take, call.call_id))
            holds.append(
                (call.call_id, developer_id, call.server, call.method, call.name, call.held, call.fee, charge_id)
            )
            postings.append((charge_id, user_id, -take))
            if take - fee:
                postings.append((charge_id, developer_id, take - fee))
                credits[developer_id] = credits.get(developer_id, 0) + take - fee
            if fee:
                postings.append((charge_id, platform, fee))
                credits[platform] = credits.get(platform, 0) + fee
            charges.append((charge_id, call.call_id, developer_id, take, fee, balance_after))
        if transfers:
            conn.execute(_INSERT_TRANSFERS, (user_id, now, _json(transfers)))
            conn.execute(_INSERT_HOLDS, (key_id, user_id, owner, now, _json(holds)))
        if pending:
            if plan.left == 0:
                conn.execute("UPDATE holds SET state = 'voided', settled_at = ? WHERE call_id = ?", (now, grant_id))
            else:
                conn.execute("UPDATE holds SET amount = ? WHERE call_id = ?", (plan.left, grant_id))
        released = plan.from_grant + plan.given_back
        conn.execute(
            "UPDATE accounts SET balance = balance - ?, held = held - ? WHERE id = ?", (plan.total, released, user_id)
        )
        if key_id is not None:
            conn.execute(
                "UPDATE keys SET held = held - ?, spent = spent + ? WHERE id = ?", (released, plan.total, key_id)
            )
        conn.executemany(
            "UPDATE accounts SET balance = balance + ? WHERE id = ?", [(credit, a) for a, credit in credits.items()]
        )
        if transfers:
            conn.execute(_INSERT_POSTINGS, (_json(postings),))
            conn.execute(_INSERT_CHARGES, (user_id, now, _json(charges)))
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

        def tx(conn: Conn) -> dict[str, GrantState]:
            now = self._clock()
            conn.executemany(
                "UPDATE holds SET lease_expires_at = ? WHERE call_id = ? AND state = 'pending' AND method = ?",
                [(now + lease_s, grant_id, GRANT_METHOD) for grant_id in grant_ids],
            )
            states: dict[str, GrantState] = {}
            for grant_id in grant_ids:
                row = conn.execute(_GRANT_ROW, (grant_id,)).fetchone()
                if row is None:
                    continue
                _, _, amount, state, _, _, limit, spent, key_held, revoked_at, expires_at, available = row
                cap = None if limit is None else int(limit) - int(spent) - int(key_held)
                if state != HoldState.PENDING:
                    status, amount = GrantStatus.CLOSED, 0
                elif revoked_at is not None or (expires_at is not None and expires_at <= now):
                    status = GrantStatus.REVOKED
                else:
                    status = GrantStatus.OK
                states[grant_id] = GrantState(status, int(amount), int(available), cap)
            return states

        return await self._write(tx, durable=False)

    async def grants_outstanding(self, user: str, key_id: str | None = None) -> int:
        def tx(conn: Conn) -> int:
            value = conn.execute(
                "SELECT COALESCE(SUM(h.amount), 0) FROM holds h JOIN accounts a ON a.id = h.user_account_id "
                "WHERE h.state = 'pending' AND h.method = ? AND a.kind = 'user' AND a.name = ? "
                "AND (? IS NULL OR h.key_id = ?)",
                (GRANT_METHOD, user, key_id, key_id),
            ).fetchone()[0]
            return int(value)

        return await self._read(tx)
