"""Scale run: fill a ledger with a large, consistent history directly in SQL (much faster than
through the API), so the paid call can be timed against it and against an empty ledger.

The history: ``users`` synthetic users, each topped up once (2 postings each), ``keys`` API keys
(key ``j`` belongs to user ``j mod users``), and ``charges`` captured calls (2 postings each: user
−1¢, developer +1¢; no fee), charge ``i`` made through key ``i mod keys``. Call ids are random
hex like the gateway's uuid4 ids, so index inserts land at random places as in production.
Balances, held and spent columns are set to exactly what the postings say, so ``ledger verify``
stays clean. The bench developer (``bench-dev``) earns every synthetic charge.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from bench.agentpay import DEVELOPER

# millicents per synthetic user: far above what its charges take, and 100,000 users of it (10^14) well
# within the money the ledger may hold (ledger.base.MAX_BALANCE; the world account is -users * TOPUP)
TOPUP = 10**9
PRICE = 1000


@dataclass(frozen=True)
class Scale:
    users: int
    keys: int
    charges: int

    @property
    def postings(self) -> int:
        return 2 * self.users + 2 * self.charges

    def check(self) -> None:
        if self.keys % self.users or self.charges % self.keys:
            raise ValueError("keys must be a multiple of users and charges a multiple of keys")


FULL = Scale(users=100_000, keys=1_000_000, charges=5_000_000)  # 10.2 M postings, 1 M keys
QUICK = Scale(users=2_000, keys=20_000, charges=100_000)  # 204 k postings, 20 k keys


def _sqlite_call_id(var: str) -> str:
    """A 32-hex call id for row ``var``: unique (its last part is the row number) and scattered
    (a multiplicative hash leads), like the gateway's uuid4 hex ids."""
    mults = ((2654435761, 0), (2246822519, 7), (3266489917, 13))
    parts = ", ".join(f"({var} * {m} + {a}) % 4294967296" for m, a in mults)
    return f"printf('%08x%08x%08x%08x', {parts}, {var})"


def fill_sqlite(path: str, scale: Scale, log: Any = print) -> dict[str, Any]:
    scale.check()
    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -4000000")  # 4 GB of page cache for the bulk load
    conn.execute("PRAGMA temp_store = MEMORY")
    dev_id = conn.execute("SELECT id FROM accounts WHERE kind = 'developer' AND name = ?", (DEVELOPER,)).fetchone()[0]
    world_id = conn.execute("SELECT id FROM accounts WHERE kind = 'world'").fetchone()[0]
    base = conn.execute("SELECT max(id) FROM accounts").fetchone()[0] + 1
    now = time.time() - 86400
    u, k, c = scale.users, scale.keys, scale.charges
    per_key = c // k
    per_user = c // u

    def step(name: str, sql: str, *args: Any) -> None:
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute(sql, args)
        conn.execute("COMMIT")
        log(f"[scale] sqlite {name}: {time.perf_counter() - t0:.1f}s")

    seq = "WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < ?) "
    step(
        "users",
        seq + "INSERT INTO accounts (id, kind, name, balance, held, created_at) "
        "SELECT ? + i, 'user', 'scale-user-' || i, ?, 0, ? FROM s",
        u - 1,
        base,
        TOPUP - per_user * PRICE,
        now,
    )
    step(
        "topup transfers",
        seq + "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
        "SELECT 'tp_scale_' || i, 'topup', ?, NULL, ? + i, ? FROM s",
        u - 1,
        TOPUP,
        base,
        now,
    )
    step(
        "topup postings",
        seq + "INSERT INTO postings (transfer_id, account_id, amount) "
        "SELECT 'tp_scale_' || (i / 2), CASE i % 2 WHEN 0 THEN ? ELSE ? + i / 2 END, "
        "CASE i % 2 WHEN 0 THEN -? ELSE ? END FROM s",
        2 * u - 1,
        world_id,
        base,
        TOPUP,
        TOPUP,
    )
    step(
        "keys",
        seq + "INSERT INTO keys (id, user_account_id, server, key_hash, prefix, created_at, spent, held) "
        "SELECT 'key_scale_' || i, ? + i % ?, 'bench', lower(hex(randomblob(32))), 'ap_sc' || i, ?, ?, 0 FROM s",
        k - 1,
        base,
        u,
        now,
        per_key * PRICE,
    )
    cid = _sqlite_call_id("i")
    step(
        "charge transfers",
        seq + f"INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
        f"SELECT 'ch_' || {cid}, 'charge', ?, {cid}, ? + i % ?, ? + i * 0.001 FROM s",
        c - 1,
        PRICE,
        base,
        u,
        now,
    )
    step(
        "holds",
        seq + f"INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, "
        f"amount, fee, state, owner, created_at, lease_expires_at, settled_at, charge_id) "
        f"SELECT {cid}, 'key_scale_' || (i % ?), ? + i % ?, ?, 'bench', 'tools/call', 'get_forecast', ?, 0, "
        f"'captured', 'scale', ? + i * 0.001, ? + 30, ? + i * 0.001, 'ch_' || {cid} FROM s",
        c - 1,
        k,
        base,
        u,
        dev_id,
        PRICE,
        now,
        now,
        now,
    )
    step(
        "charges",
        seq + f"INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, refunded, "
        f"balance_after, created_at) SELECT 'ch_' || {cid}, {cid}, ? + i % ?, ?, ?, 0, 0, ?, ? + i * 0.001 FROM s",
        c - 1,
        base,
        u,
        dev_id,
        PRICE,
        TOPUP - per_user * PRICE,
        now,
    )
    step(
        "charge postings",
        seq + f"INSERT INTO postings (transfer_id, account_id, amount) "
        f"SELECT 'ch_' || {_sqlite_call_id('j')}, "
        f"CASE i % 2 WHEN 0 THEN ? + j % ? ELSE ? END, CASE i % 2 WHEN 0 THEN -? ELSE ? END "
        f"FROM (SELECT i, i / 2 AS j FROM s)",
        2 * c - 1,
        base,
        u,
        dev_id,
        PRICE,
        PRICE,
    )
    step("developer balance", "UPDATE accounts SET balance = balance + ? WHERE id = ?", c * PRICE, dev_id)
    step("world balance", "UPDATE accounts SET balance = balance - ? WHERE id = ?", u * TOPUP, world_id)
    t0 = time.perf_counter()
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    log(f"[scale] sqlite analyze + checkpoint: {time.perf_counter() - t0:.1f}s")
    counts = {
        "postings": conn.execute("SELECT count(*) FROM postings").fetchone()[0],
        "keys": conn.execute("SELECT count(*) FROM keys").fetchone()[0],
        "charges": conn.execute("SELECT count(*) FROM charges").fetchone()[0],
    }
    conn.close()
    return {**counts, "seconds": round(time.perf_counter() - started, 1)}


async def fill_postgres(url: str, scale: Scale, log: Any = print) -> dict[str, Any]:
    import asyncpg

    scale.check()
    started = time.perf_counter()
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute("SET synchronous_commit = off")
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await conn.execute("SET work_mem = '256MB'")
        dev_id = await conn.fetchval("SELECT id FROM accounts WHERE kind = 'developer' AND name = $1", DEVELOPER)
        world_id = await conn.fetchval("SELECT id FROM accounts WHERE kind = 'world'")
        now = time.time() - 86400
        u, k, c = scale.users, scale.keys, scale.charges
        per_key, per_user = c // k, c // u

        async def step(name: str, sql: str, *args: Any) -> None:
            t0 = time.perf_counter()
            await conn.execute(sql, *args)
            log(f"[scale] postgres {name}: {time.perf_counter() - t0:.1f}s")

        await step(
            "users",
            "INSERT INTO accounts (kind, name, balance, held, created_at) "
            "SELECT 'user', 'scale-user-' || i, $2, 0, $3 FROM generate_series(0, $1 - 1) i",
            u,
            TOPUP - per_user * PRICE,
            now,
        )
        await step(
            "scale user ids",
            "CREATE TEMP TABLE su AS SELECT substr(name, 12)::int AS i, id FROM accounts "
            "WHERE kind = 'user' AND name LIKE 'scale-user-%'",
        )
        await conn.execute("CREATE UNIQUE INDEX ON su (i)")
        await step(
            "topup transfers",
            "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
            "SELECT 'tp_scale_' || i, 'topup', $1, NULL, id, $2 FROM su",
            TOPUP,
            now,
        )
        await step(
            "topup postings",
            "INSERT INTO postings (transfer_id, account_id, amount) "
            "SELECT 'tp_scale_' || i, $1, -$2::bigint FROM su UNION ALL SELECT 'tp_scale_' || i, id, $2 FROM su",
            world_id,
            TOPUP,
        )
        await step(
            "keys",
            "INSERT INTO keys (id, user_account_id, server, key_hash, prefix, created_at, spent, held) "
            "SELECT 'key_scale_' || g, su.id, 'bench', md5(g::text || 'k') || md5(g::text || 'h'), 'ap_sc' || g, "
            "$3, $4, 0 FROM generate_series(0, $1 - 1) g JOIN su ON su.i = g % $2",
            k,
            u,
            now,
            per_key * PRICE,
        )
        series = "FROM generate_series(0, $1 - 1) g JOIN su ON su.i = g % $2"
        await step(
            "charge transfers",
            "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
            f"SELECT 'ch_' || md5(g::text), 'charge', $3, md5(g::text), su.id, $4 + g * 0.001 {series}",
            c,
            u,
            PRICE,
            now,
        )
        await step(
            "holds",
            "INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, "
            "amount, fee, state, owner, created_at, lease_expires_at, settled_at, charge_id) "
            "SELECT md5(g::text), 'key_scale_' || (g % $3), su.id, $4, 'bench', 'tools/call', 'get_forecast', "
            f"$5, 0, 'captured', 'scale', $6 + g * 0.001, $6 + 30, $6 + g * 0.001, 'ch_' || md5(g::text) {series}",
            c,
            u,
            k,
            dev_id,
            PRICE,
            now,
        )
        await step(
            "charges",
            "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, refunded, "
            "balance_after, created_at) SELECT 'ch_' || md5(g::text), md5(g::text), su.id, $3, $4, 0, 0, $5, "
            f"$6 + g * 0.001 {series}",
            c,
            u,
            dev_id,
            PRICE,
            TOPUP - per_user * PRICE,
            now,
        )
        await step(
            "charge postings",
            "INSERT INTO postings (transfer_id, account_id, amount) "
            f"SELECT 'ch_' || md5(g::text), su.id, -$3::bigint {series} "
            "UNION ALL SELECT 'ch_' || md5(g::text), $4, $3 FROM generate_series(0, $1 - 1) g",
            c,
            u,
            PRICE,
            dev_id,
        )
        await step("developer balance", "UPDATE accounts SET balance = balance + $1 WHERE id = $2", c * PRICE, dev_id)
        await step("world balance", "UPDATE accounts SET balance = balance - $1 WHERE id = $2", u * TOPUP, world_id)
        await step("vacuum analyze", "VACUUM ANALYZE")
        counts = {
            "postings": await conn.fetchval("SELECT count(*) FROM postings"),
            "keys": await conn.fetchval("SELECT count(*) FROM keys"),
            "charges": await conn.fetchval("SELECT count(*) FROM charges"),
        }
    finally:
        await conn.close()
    return {**counts, "seconds": round(time.perf_counter() - started, 1)}
