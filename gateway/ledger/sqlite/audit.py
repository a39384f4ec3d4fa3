"""The SQLite ledger's ``Audit`` concern: ``verify`` (every invariant, ``_verify`` and
``_verify_payouts``), and ``export_rows`` / ``import_rows`` (a whole ledger between stores)."""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from gateway.errors import Conflict, InvalidInput
from gateway.ledger.base import EXPORT_COLUMNS, EXPORT_TABLES, MAX_BALANCE, AccountKind, ExportRow, imported_debt
from gateway.ledger.dump import check_row
from gateway.ledger.sqlite.common import Conn
from gateway.ledger.sqlite.store import SqliteStore

# export_rows: one query per table, columns in EXPORT_COLUMNS order, rows in dependency order (a
# refund after the charge it names; charges in insertion order, which user_summary relies on).
_EXPORT_QUERIES: dict[str, str] = {
    "accounts": "SELECT id, kind, name, balance, held, created_at FROM accounts ORDER BY id",
    "transfers": "SELECT id, kind, amount, reference, account_id, charge_id, created_at FROM transfers "
    "ORDER BY charge_id IS NOT NULL, created_at, id",
    "postings": "SELECT id, transfer_id, account_id, amount FROM postings ORDER BY id",
    "keys": "SELECT id, user_account_id, server, key_hash, prefix, created_at, expires_at, revoked_at, "
    "spend_limit, spent, held, name, last_used_at FROM keys ORDER BY created_at, id",
    "holds": "SELECT call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee, "
    "state, owner, created_at, lease_expires_at, settled_at, charge_id FROM holds ORDER BY created_at, call_id",
    "charges": "SELECT id, call_id, user_account_id, developer_account_id, amount, fee, refunded, balance_after, "
    "created_at FROM charges ORDER BY rowid",
    "service_tokens": "SELECT id, developer_account_id, servers, token_hash, prefix, created_at, revoked_at "
    "FROM service_tokens ORDER BY created_at, id",
    "payouts": "SELECT p.id, p.developer_account_id, p.amount, p.state, p.reference, "
    "(SELECT t.id FROM transfers t WHERE t.kind = 'payout' AND t.reference = p.id), p.created_at, p.completed_at "
    "FROM payouts p ORDER BY p.created_at, p.id",
}


class SqliteAudit(SqliteStore):
    """Checking every invariant, and moving a whole ledger between stores."""

    async def verify(self) -> list[str]:
        return await self._read(_verify)

    async def export_rows(self) -> list[ExportRow]:
        def tx(conn: Conn) -> list[ExportRow]:
            rows: list[ExportRow] = []
            for table in EXPORT_TABLES:
                names = [name for name, _ in EXPORT_COLUMNS[table]]
                for values in conn.execute(_EXPORT_QUERIES[table]):
                    row = dict(zip(names, values, strict=True))
                    if table == "service_tokens":
                        row["servers"] = json.loads(row["servers"])
                    rows.append((table, row))
            return rows

        return await self._read(tx)

    async def import_rows(self, rows: Iterable[ExportRow]) -> dict[str, int]:
        checked = [(table, check_row(table, row)) for table, row in rows]

        def tx(conn: Conn) -> tuple[dict[str, int], dict[AccountKind, int]]:
            in_use = conn.execute(
                "SELECT (SELECT COUNT(*) FROM accounts WHERE kind IN ('user', 'developer')), "
                "(SELECT COUNT(*) FROM transfers), (SELECT COUNT(*) FROM keys), (SELECT COUNT(*) FROM holds), "
                "(SELECT COUNT(*) FROM service_tokens), (SELECT COUNT(*) FROM payouts)"
            ).fetchone()
            if any(in_use):
                raise Conflict(
                    f"the target ledger {self.path} is not empty ({in_use[0]} users/developers, "
                    f"{in_use[1]} transfers); import only into a new, empty ledger",
                    hint="Point --into at a new database file",
                )
            conn.execute("DELETE FROM accounts")  # only the system accounts: the dump brings its own
            counts = dict.fromkeys(EXPORT_TABLES, 0)
            for number, (table, row) in enumerate(checked, start=1):
                values = dict(row)
                if table == "service_tokens":
                    values["servers"] = json.dumps(values["servers"])
                if table == "payouts":
                    del values["transfer_id"]  # SQLite finds a payout's transfer by its reference
                if table == "accounts":
                    values["debt"] = imported_debt(values)
                names = list(values)
                try:
                    conn.execute(
                        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [values[name] for name in names],
                    )
                except sqlite3.IntegrityError as exc:
                    first = next(iter(row.values()))
                    raise InvalidInput(f"row {number} ({table} {first!r}) of the dump does not fit: {exc}") from None
                counts[table] += 1
            return counts, self._tx_system_accounts(conn)  # a dump without them still gets them

        counts, self._system = await self._write(tx)
        return counts


def _verify(conn: Conn) -> list[str]:
    """Every invariant, checked inside the caller's single read transaction."""
    problems: list[str] = []

    def q(sql: str) -> list[Any]:
        return conn.execute(sql).fetchall()

    total = q("SELECT COALESCE(SUM(amount), 0) FROM postings")[0][0]
    if total != 0:
        problems.append(f"postings sum to {total}, not 0")
    for transfer_id, s in q(
        "SELECT transfer_id, SUM(amount) FROM postings GROUP BY transfer_id HAVING SUM(amount) <> 0"
    ):
        problems.append(f"transfer {transfer_id}: postings sum to {s}, not 0")
    for transfer_id, kind, amount, credits in q(
        "SELECT t.id, t.kind, t.amount, COALESCE(SUM(CASE WHEN p.amount > 0 THEN p.amount END), 0) "
        "FROM transfers t LEFT JOIN postings p ON p.transfer_id = t.id GROUP BY t.id "
        "HAVING COALESCE(SUM(CASE WHEN p.amount > 0 THEN p.amount END), 0) <> t.amount"
    ):
        problems.append(f"{kind} transfer {transfer_id}: amount {amount} but its credits sum to {credits}")
    for kind, name, balance, s in q(
        "SELECT a.kind, a.name, a.balance, COALESCE(p.s, 0) FROM accounts a "
        "LEFT JOIN (SELECT account_id, SUM(amount) AS s FROM postings GROUP BY account_id) p "
        "ON p.account_id = a.id WHERE a.balance <> COALESCE(p.s, 0)"
    ):
        problems.append(f"{kind} {name!r}: balance {balance} but its postings sum to {s}")
    for kind, name, held, s in q(
        "SELECT a.kind, a.name, a.held, COALESCE(h.s, 0) FROM accounts a "
        "LEFT JOIN (SELECT user_account_id, SUM(amount) AS s FROM holds WHERE state = 'pending' "
        "GROUP BY user_account_id) h ON h.user_account_id = a.id WHERE a.held <> COALESCE(h.s, 0)"
    ):
        problems.append(f"{kind} {name!r}: held {held} but its pending holds sum to {s}")
    for key_id, held, s in q(
        "SELECT k.id, k.held, COALESCE(h.s, 0) FROM keys k "
        "LEFT JOIN (SELECT key_id, SUM(amount) AS s FROM holds WHERE state = 'pending' GROUP BY key_id) h "
        "ON h.key_id = k.id WHERE k.held <> COALESCE(h.s, 0)"
    ):
        problems.append(f"key {key_id}: held {held} but its pending holds sum to {s}")
    for key_id, spent, s in q(
        "SELECT k.id, k.spent, COALESCE(c.s, 0) FROM keys k "
        "LEFT JOIN (SELECT h.key_id, SUM(c.amount - c.refunded) AS s FROM charges c "
        "JOIN holds h ON h.call_id = c.call_id GROUP BY h.key_id) c "
        "ON c.key_id = k.id WHERE k.spent <> COALESCE(c.s, 0)"
    ):
        problems.append(f"key {key_id}: spent {spent} but its charges net of refunds sum to {s}")
    # Only a clawback takes a user's available below zero (every other debit is guarded, a capture
    # never lowers it), so it is never lower than minus what the user's clawbacks took.
    for name, balance, held, clawed in q(
        "SELECT a.name, a.balance, a.held, COALESCE(c.s, 0) FROM accounts a "
        "LEFT JOIN (SELECT account_id, SUM(amount) AS s FROM transfers WHERE kind = 'clawback' "
        "GROUP BY account_id) c ON c.account_id = a.id "
        "WHERE a.kind = 'user' AND (a.balance - a.held < -COALESCE(c.s, 0) OR a.held < 0)"
    ):
        problems.append(
            f"user {name!r}: balance {balance} with {held} held leaves a negative available "
            f"beyond its clawbacks ({clawed})"
        )
    for kind, name, held in q("SELECT kind, name, held FROM accounts WHERE held < 0 AND kind <> 'user'"):
        problems.append(f"{kind} {name!r}: negative held {held}")
    for kind, name, balance, stored in q(
        "SELECT kind, name, balance, typeof(balance) FROM accounts "
        f"WHERE typeof(balance) <> 'integer' OR balance > {MAX_BALANCE} OR balance < {-MAX_BALANCE}"
    ):
        problems.append(f"{kind} {name!r}: balance {balance!r} ({stored}) is not an integer within +-{MAX_BALANCE}")
    for kind, name, balance in q(
        "SELECT kind, name, balance FROM accounts "
        "WHERE kind IN ('developer', 'platform_fee', 'payout_clearing') AND balance < 0"
    ):
        problems.append(f"{kind} {name!r}: negative balance {balance}")
    for call_id, charge_id, hold_amount, charge_amount, transfer_kind, user_posting in q(
        "SELECT h.call_id, h.charge_id, h.amount, c.amount, t.kind, "
        "(SELECT SUM(p.amount) FROM postings p "
        " WHERE p.transfer_id = h.charge_id AND p.account_id = h.user_account_id) "
        "FROM holds h LEFT JOIN charges c ON c.id = h.charge_id LEFT JOIN transfers t ON t.id = h.charge_id "
        "WHERE h.state = 'captured'"
    ):
        if charge_id is None or charge_amount is None or transfer_kind != "charge":
            problems.append(f"captured hold {call_id}: no charge transfer")
        elif user_posting != -charge_amount:
            problems.append(
                f"captured hold {call_id}: charge {charge_id} debits the user {user_posting}, not {-charge_amount}"
            )
        elif charge_amount > hold_amount:
            problems.append(f"captured hold {call_id}: charged {charge_amount}, more than held {hold_amount}")
    for charge_id, refunded, s in q(
        "SELECT c.id, c.refunded, COALESCE(r.s, 0) FROM charges c "
        "LEFT JOIN (SELECT charge_id, SUM(amount) AS s FROM transfers WHERE kind = 'refund' "
        "GROUP BY charge_id) r ON r.charge_id = c.id WHERE c.refunded <> COALESCE(r.s, 0)"
    ):
        problems.append(f"charge {charge_id}: refunded {refunded} but its refunds sum to {s}")
    problems.extend(_verify_payouts(conn))
    for transfer_id, reference, amount, state, payout_amount, credited in q(
        "SELECT t.id, t.reference, t.amount, po.state, po.amount, "
        "COALESCE((SELECT SUM(p.amount) FROM postings p WHERE p.transfer_id = t.id "
        "          AND p.account_id = po.developer_account_id), 0) "
        "FROM transfers t LEFT JOIN payouts po ON po.id = t.reference WHERE t.kind = 'payout_reversal'"
    ):
        if state != "settled" or amount != payout_amount or credited != amount:
            problems.append(
                f"payout_reversal transfer {transfer_id} of payout {reference}: payout {state or 'missing'} "
                f"({payout_amount}), amount {amount}, developer {credited:+}"
            )
    return problems


# What each payout state implies: transfer kind -> (posting on payout_clearing, on the developer) as
# a multiple of the payout amount.
_PAYOUT_LEGS = {"payout": (1, -1), "payout_settle": (-1, 0), "payout_fail": (-1, 1)}
_PAYOUT_TRANSFERS = {
    "pending": {"payout"},
    "settled": {"payout", "payout_settle"},
    "failed": {"payout", "payout_fail"},
}


def _verify_payouts(conn: Conn) -> list[str]:
    problems: list[str] = []
    for balance, pending in conn.execute(
        "SELECT a.balance, (SELECT COALESCE(SUM(amount), 0) FROM payouts WHERE state = 'pending') "
        "FROM accounts a WHERE a.kind = 'payout_clearing'"
    ).fetchall():
        if balance != pending:
            problems.append(f"payout_clearing: balance {balance} but pending payouts sum to {pending}")
    payouts = {
        row[0]: row[1:]
        for row in conn.execute("SELECT id, state, amount, developer_account_id FROM payouts").fetchall()
    }
    found: dict[str, set[str]] = defaultdict(set)
    for transfer_id, kind, reference, amount, clearing, developer in conn.execute(
        "SELECT t.id, t.kind, t.reference, t.amount, "
        "COALESCE((SELECT SUM(p.amount) FROM postings p JOIN accounts a ON a.id = p.account_id "
        "          WHERE p.transfer_id = t.id AND a.kind = 'payout_clearing'), 0), "
        "COALESCE((SELECT SUM(p.amount) FROM postings p JOIN payouts po ON po.id = t.reference "
        "          WHERE p.transfer_id = t.id AND p.account_id = po.developer_account_id), 0) "
        "FROM transfers t WHERE t.kind IN ('payout', 'payout_settle', 'payout_fail')"
    ).fetchall():
        if reference not in payouts:
            problems.append(f"{kind} transfer {transfer_id}: belongs to no payout")
            continue
        state, payout_amount, _ = payouts[reference]
        found[reference].add(kind)
        want_clearing, want_developer = _PAYOUT_LEGS[kind]
        if (amount, clearing, developer) != (
            payout_amount,
            want_clearing * payout_amount,
            want_developer * payout_amount,
        ):
            problems.append(
                f"{kind} transfer {transfer_id} of payout {reference} ({payout_amount}): amount {amount}, "
                f"payout_clearing {clearing:+}, developer {developer:+}"
            )
    for payout_id, (state, _, _) in payouts.items():
        expected = _PAYOUT_TRANSFERS[state]
        if found[payout_id] != expected:
            missing = ", ".join(sorted(expected - found[payout_id])) or "none"
            extra = ", ".join(sorted(found[payout_id] - expected)) or "none"
            problems.append(f"{state} payout {payout_id}: missing transfers {missing}; unexpected {extra}")
    return problems
