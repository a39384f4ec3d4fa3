"""The SQLite ledger's ``Allowances`` concern: free calls per day (``free_calls_per_day``).

A claim is one conditional ``INSERT … SELECT … WHERE (count) < limit`` run on the single writer,
so concurrent claims (of this process or another opening the same file) never exceed the limit.
A claim is answered at COMMIT (``durable=False``, like a hold: it is on the request's path); a crash
that loses it leaves that one call uncounted. Keeping a used call is durable, as a capture is."""

from __future__ import annotations

from gateway.ledger.base import FreeCall
from gateway.ledger.sqlite.common import Conn
from gateway.ledger.sqlite.store import SqliteStore

_COUNT = "SELECT COUNT(*) FROM free_calls WHERE user_name = ? AND server = ? AND scope = ? AND day = ?"


class SqliteAllowances(SqliteStore):
    """Free allowances, counted in the database."""

    async def claim_free_call(self, call: FreeCall) -> bool:
        def tx(conn: Conn) -> bool:
            cursor = conn.execute(
                "INSERT INTO free_calls (call_id, user_name, server, scope, day, name, state, created_at) "
                f"SELECT ?, ?, ?, ?, ?, ?, 'pending', ? WHERE ({_COUNT}) < ? "
                "ON CONFLICT (call_id) DO NOTHING",
                (
                    call.call_id,
                    call.user,
                    call.server,
                    call.scope,
                    call.day,
                    call.name,
                    self._clock(),
                    call.user,
                    call.server,
                    call.scope,
                    call.day,
                    call.limit,
                ),
            )
            return cursor.rowcount == 1

        return await self._write(tx, durable=False)  # like a hold: answered at COMMIT, before forwarding

    async def settle_free_call(self, call_id: str, *, used: bool) -> None:
        def tx(conn: Conn) -> None:
            if used:
                conn.execute("UPDATE free_calls SET state = 'used' WHERE call_id = ? AND state = 'pending'", (call_id,))
            else:
                conn.execute("DELETE FROM free_calls WHERE call_id = ? AND state = 'pending'", (call_id,))

        await self._write(tx)

    async def free_calls_used(self, user: str, server: str, scope: str, day: str) -> int:
        def read(conn: Conn) -> int:
            return int(conn.execute(_COUNT, (user, server, scope, day)).fetchone()[0])

        return await self._read(read)
