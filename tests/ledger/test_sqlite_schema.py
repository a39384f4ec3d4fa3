"""The SQLite schema keeps only the indexes its queries use: each index is written by every hold
and capture, so one that serves no query is pure cost on the hot path (migration 0004)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.ledger.sqlite import SqliteLedger
from gateway.ledger.sqlite.audit import _verify


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


async def test_verify_reads_holds_only_through_an_index_never_by_scanning_every_hold(tmp_path: Path) -> None:
    """verify's own statements, as it runs them: holds (one row per priced call ever made) are
    read through an index (pending holds through holds_pending_lease), never scanned whole."""
    conn = await _open(tmp_path / "ledger.db")
    statements: list[str] = []
    try:
        conn.set_trace_callback(statements.append)
        assert _verify(conn) == []
        conn.set_trace_callback(None)
        reading_holds = [sql for sql in statements if "holds" in sql and sql.lstrip().upper().startswith("SELECT")]
        assert reading_holds  # verify does check the holds
        for sql in reading_holds:
            plan = " | ".join(str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql))
            for step in plan.split(" | "):
                if " holds" in f" {step}" and step.startswith("SCAN"):
                    assert "USING" in step and "INDEX" in step, f"{sql}\n  -> {plan}"
    finally:
        conn.close()
