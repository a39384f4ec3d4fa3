"""The PostgreSQL ledger's ``Allowances`` concern: free calls per day (``free_calls_per_day``).

A claim takes a transaction-scoped advisory lock on its (user, server, scope, day) before its
conditional ``INSERT … SELECT … WHERE (count) < limit``: under READ COMMITTED the insert's snapshot
is taken after the lock, so it sees every claim committed before, and replicas sharing the
database never exceed the limit together."""

from __future__ import annotations

from gateway.ledger.base import FreeCall
from gateway.ledger.postgres.common import Conn
from gateway.ledger.postgres.store import PostgresStore

_COUNT = "SELECT COUNT(*) FROM free_calls WHERE user_name = $1 AND server = $2 AND scope = $3 AND day = $4"


class PostgresAllowances(PostgresStore):
    """Free allowances, counted in the database."""

    async def claim_free_call(self, call: FreeCall) -> bool:
        async def tx(conn: Conn) -> bool:
            lock = "\x1f".join(("free_calls", call.user, call.server, call.scope, call.day))
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", lock)
            row = await conn.fetchrow(
                "INSERT INTO free_calls (call_id, user_name, server, scope, day, name, state, created_at) "
                f"SELECT $5, $1, $2, $3, $4, $6, 'pending', $7 WHERE ({_COUNT}) < $8 "
                "ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
                call.user,
                call.server,
                call.scope,
                call.day,
                call.call_id,
                call.name,
                float(self._clock()),
                call.limit,
            )
            return row is not None

        return await self._run(tx, idempotent=True)

    async def settle_free_call(self, call_id: str, *, used: bool) -> None:
        async def tx(conn: Conn) -> None:
            if used:
                await conn.execute(
                    "UPDATE free_calls SET state = 'used' WHERE call_id = $1 AND state = 'pending'", call_id
                )
            else:
                await conn.execute("DELETE FROM free_calls WHERE call_id = $1 AND state = 'pending'", call_id)

        await self._run(tx, idempotent=True)

    async def free_calls_used(self, user: str, server: str, scope: str, day: str) -> int:
        async def read(conn: Conn) -> int:
            return int(await conn.fetchval(_COUNT, user, server, scope, day))

        return await self._read(read)
