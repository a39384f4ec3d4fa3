"""The SQLite schema keeps only the indexes its queries use: each index is written by every hold
and capture, so one that serves no query is pure cost on the hot path (migration 0004)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.ledger.sqlite import SqliteLedger


async def _open(path: Path) -> sqlite3.Connection:
    async with SqliteLedger(path):
        pass
    return sqlite3.connect(path)


def _indexes(conn: sqlite3.Connection, table: str) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?", (table,))
    return {name for (name,) in rows if not name.startswith("sqlite_autoindex_")}


async def test_the_hot_path_tables_carry_no_index_that_another_index_already_covers(tmp_path: Path) -> None:
    conn = await _open(tmp_path / "ledger.db")
    try:
        assert _indexes(conn, "holds") == {"holds_pending_lease"}
        assert _indexes(conn, "postings") == {"postings_account", "postings_transfer_account"}
        assert _indexes(conn, "charges") == {"charges_user_recent", "charges_developer_recent", "charges_created"}
    finally:
        conn.close()


async def test_verify_sums_pending_holds_through_the_pending_hold_index_not_a_scan_of_every_hold(
    tmp_path: Path,
) -> None:
    conn = await _open(tmp_path / "ledger.db")
    try:
        for column in ("user_account_id", "key_id"):
            plan = conn.execute(
                f"EXPLAIN QUERY PLAN SELECT {column}, SUM(amount) FROM holds WHERE state = 'pending' GROUP BY {column}"
            ).fetchall()
            details = " ".join(str(row[3]) for row in plan)
            assert "USING INDEX holds_pending_lease" in details, details
    finally:
        conn.close()
