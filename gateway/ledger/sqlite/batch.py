"""Vectorised holds and captures for the SQLite writer's group commit.

When many holds (or many captures) are queued together, running each as its own dozen statements
costs ~0.1 ms of Python per operation on the writer thread, which shares the GIL with the event
loop. These functions do a whole run of them with a fixed number of statements: one ``SELECT`` per
table to read the current state, the decisions in Python *in queue order* (so each caller gets
exactly the answer the one-at-a-time path would give), then one ``executemany`` per table, with
balance changes summed per account and per key.

They run inside the group's ``BEGIN IMMEDIATE`` transaction, so what they read cannot change under
them, even with other processes on the same file. The database's ``CHECK`` constraints still guard
every row: if one fires (or anything else fails), the caller rolls the whole run back to its
savepoint and replays it one operation at a time, so an unexpected failure is reported to exactly
the operation that caused it.

Each function returns one ``(ok, value)`` per operation: ``(True, result)`` or ``(False, exc)``.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway.errors import Conflict, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import Charge, HoldOutcome, HoldRequest, HoldState, HoldStatus, charge_id_for
from gateway.ledger.rows import HOLD_INSERT_COLUMNS, hold_row
from gateway.money import format_cents

Conn = sqlite3.Connection
Outcome = tuple[bool, Any]

_CHUNK = 500  # bound parameters per IN (...) query, well under SQLite's limit


def _select_in(conn: Conn, sql: str, values: Sequence[Any]) -> list[Any]:
    """Run ``sql`` (which ends in ``IN ({})``) over ``values`` in chunks; all rows."""
    rows: list[Any] = []
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start : start + _CHUNK]
        rows.extend(conn.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall())
    return rows


@dataclass(slots=True)
class _Key:
    user_id: int
    limit: int | None
    spent: int
    held: int

    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.spent - self.held


@dataclass(slots=True)
class _Hold:
    """What a hold row says, for replays and captures within one run."""

    key_id: str | None
    user_id: int
    developer_id: int
    server: str
    method: str
    name: str
    amount: int
    fee: int
    state: str
    charge_id: str | None


_BY_NAME = {
    "user": "SELECT id, name FROM accounts WHERE kind = 'user' AND name IN ({})",
    "developer": "SELECT id, name FROM accounts WHERE kind = 'developer' AND name IN ({})",
}


def _account_ids(conn: Conn, names: Sequence[tuple[str, str]]) -> dict[tuple[str, str], int]:
    ids: dict[tuple[str, str], int] = {}
    for kind, sql in _BY_NAME.items():
        wanted = [name for k, name in names if k == kind]
        for row in _select_in(conn, sql, wanted):
            ids[(kind, row[1])] = int(row[0])
    return ids


def _available(conn: Conn, account_ids: Sequence[int]) -> dict[int, int]:
    rows = _select_in(conn, "SELECT id, balance - held FROM accounts WHERE id IN ({})", account_ids)
    return {int(row[0]): int(row[1]) for row in rows}


def _keys(conn: Conn, key_ids: Sequence[str]) -> dict[str, _Key]:
    rows = _select_in(conn, "SELECT id, user_account_id, spend_limit, spent, held FROM keys WHERE id IN ({})", key_ids)
    return {row[0]: _Key(int(row[1]), row[2], int(row[3]), int(row[4])) for row in rows}


def _holds(conn: Conn, call_ids: Sequence[str]) -> dict[str, _Hold]:
    rows = _select_in(
        conn,
        "SELECT call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee, "
        "state, charge_id FROM holds WHERE call_id IN ({})",
        call_ids,
    )
    return {row[0]: _Hold(*row[1:]) for row in rows}


def hold_many(conn: Conn, reqs: Sequence[HoldRequest], now: float) -> list[Outcome]:
    """Place a run of holds (each already checked by ``SqliteHolds._check_hold_request``)."""
    ids = _account_ids(conn, [("user", r.user) for r in reqs] + [("developer", r.developer) for r in reqs])
    available = _available(conn, list({ids[("user", r.user)] for r in reqs if ("user", r.user) in ids}))
    keys = _keys(conn, [r.key_id for r in reqs if r.key_id is not None])
    holds = _holds(conn, [r.call_id for r in reqs])

    outcomes: list[Outcome] = []
    inserts: list[tuple[Any, ...]] = []
    held_by_account: dict[int, int] = defaultdict(int)
    held_by_key: dict[str, int] = defaultdict(int)
    for req in reqs:
        user_id = ids.get(("user", req.user))
        developer_id = ids.get(("developer", req.developer))
        if user_id is None:
            outcomes.append((False, NotFound(f"no user named {req.user!r}")))
            continue
        if developer_id is None:
            outcomes.append((False, NotFound(f"no developer named {req.developer!r}")))
            continue
        key = None
        if req.key_id is not None:
            key = keys.get(req.key_id)
            if key is None:
                outcomes.append((False, NotFound(f"no key {req.key_id!r}")))
                continue
            if key.user_id != user_id:
                outcomes.append((False, InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")))
                continue
        spend_remaining = None if key is None else key.remaining()
        existing = holds.get(req.call_id)
        if existing is not None:
            same = (existing.user_id, existing.developer_id, existing.server, existing.name, existing.amount)
            if same != (user_id, developer_id, req.server, req.name, req.amount):
                outcomes.append(
                    (
                        False,
                        IdempotencyConflict(
                            f"call id {req.call_id!r} was already used for a different user, developer, server, "
                            "name or amount"
                        ),
                    )
                )
            else:
                outcomes.append((True, HoldOutcome(HoldStatus.REPLAYED, available[user_id], spend_remaining)))
            continue
        if available[user_id] < req.amount:
            outcomes.append((True, HoldOutcome(HoldStatus.INSUFFICIENT_FUNDS, available[user_id], spend_remaining)))
            continue
        if key is not None and spend_remaining is not None and spend_remaining < req.amount:
            outcomes.append((True, HoldOutcome(HoldStatus.SPEND_LIMIT, available[user_id], spend_remaining)))
            continue
        available[user_id] -= req.amount
        held_by_account[user_id] += req.amount
        if key is not None and req.key_id is not None:
            key.held += req.amount
            held_by_key[req.key_id] += req.amount
        holds[req.call_id] = _Hold(
            req.key_id, user_id, developer_id, req.server, req.method, req.name, req.amount, req.fee, "pending", None
        )
        inserts.append(hold_row(req, user_id, developer_id, now))
        outcomes.append(
            (True, HoldOutcome(HoldStatus.OK, available[user_id], None if key is None else key.remaining()))
        )
    conn.executemany(
        f"INSERT INTO holds ({HOLD_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        inserts,
    )
    conn.executemany(
        "UPDATE accounts SET held = held + ? WHERE id = ?", [(amount, a) for a, amount in held_by_account.items()]
    )
    conn.executemany("UPDATE keys SET held = held + ? WHERE id = ?", [(amount, k) for k, amount in held_by_key.items()])
    return outcomes


def capture_many(
    conn: Conn,
    items: Sequence[tuple[str, int | None]],
    now: float,
    platform_fee_id: int,
    charge_by_id: Callable[[Conn, str], Charge],
) -> list[Outcome]:
    """Capture a run of holds: ``items`` are (call_id, amount or None for the whole hold).
    ``charge_by_id(conn, charge_id)`` reads back a charge made earlier (an idempotent replay)."""
    holds = _holds(conn, [call_id for call_id, _ in items])
    user_ids = {h.user_id for h in holds.values()}
    names_and_available = _select_in(
        conn,
        "SELECT id, name, balance - held FROM accounts WHERE id IN ({})",
        list(user_ids | {h.developer_id for h in holds.values()}),
    )
    names = {int(row[0]): row[1] for row in names_and_available}
    available = {int(row[0]): int(row[2]) for row in names_and_available if row[0] in user_ids}

    outcomes: list[Outcome] = []
    made: dict[str, Charge] = {}
    transfers: list[tuple[Any, ...]] = []
    settled: list[tuple[Any, ...]] = []
    postings: list[tuple[str, int, int]] = []
    charges: list[tuple[Any, ...]] = []
    balance: dict[int, int] = defaultdict(int)
    released: dict[int, int] = defaultdict(int)
    by_key: dict[str, list[int]] = {}
    for call_id, amount in items:
        hold = holds.get(call_id)
        if hold is None:
            outcomes.append((False, NotFound(f"no hold for call {call_id!r}")))
            continue
        if hold.state == HoldState.CAPTURED:
            earlier = made.get(call_id)
            try:
                charge = earlier if earlier is not None else charge_by_id(conn, str(hold.charge_id))
                outcomes.append((True, replace(charge, replayed=True)))
            except NotFound as exc:
                outcomes.append((False, exc))
            continue
        if hold.state == HoldState.VOIDED:
            outcomes.append((False, Conflict(f"the hold for call {call_id!r} was voided; it cannot be captured")))
            continue
        take = hold.amount if amount is None else amount
        if take > hold.amount:
            outcomes.append(
                (
                    False,
                    InvalidInput(
                        f"cannot capture {format_cents(take)} cents: the hold for call {call_id!r} "
                        f"reserved only {format_cents(hold.amount)}"
                    ),
                )
            )
            continue
        fee = hold.fee * take // hold.amount
        charge_id = charge_id_for(call_id)
        available[hold.user_id] += hold.amount - take
        balance_after = available[hold.user_id]
        transfers.append((charge_id, take, call_id, hold.user_id, now))
        settled.append((charge_id, now, call_id))
        released[hold.user_id] += hold.amount
        balance[hold.user_id] -= take
        postings.append((charge_id, hold.user_id, -take))
        if take - fee:
            balance[hold.developer_id] += take - fee
            postings.append((charge_id, hold.developer_id, take - fee))
        if fee:
            balance[platform_fee_id] += fee
            postings.append((charge_id, platform_fee_id, fee))
        if hold.key_id is not None:
            per_key = by_key.setdefault(hold.key_id, [0, 0])
            per_key[0] += hold.amount
            per_key[1] += take
        charges.append((charge_id, call_id, hold.user_id, hold.developer_id, take, fee, balance_after, now))
        hold.state, hold.charge_id = HoldState.CAPTURED, charge_id
        made[call_id] = charge = Charge.captured(
            call_id,
            user=names[hold.user_id],
            developer=names[hold.developer_id],
            server=hold.server,
            method=hold.method,
            name=hold.name,
            amount=take,
            fee=fee,
            now=now,
            balance_after=balance_after,
        )
        outcomes.append((True, charge))
    conn.executemany(
        "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) VALUES (?, 'charge', ?, ?, ?, ?)",
        transfers,
    )
    cursor = conn.executemany(
        "UPDATE holds SET state = 'captured', charge_id = ?, settled_at = ? WHERE call_id = ? AND state = 'pending'",
        settled,
    )
    if cursor.rowcount != len(settled):  # cannot happen inside one transaction; the caller replays one by one
        raise sqlite3.IntegrityError(f"{len(settled) - cursor.rowcount} holds were no longer pending")
    conn.executemany(
        "UPDATE accounts SET balance = balance + ?, held = held - ? WHERE id = ?",
        [(balance.get(a, 0), released.get(a, 0), a) for a in balance.keys() | released.keys()],
    )
    conn.executemany(
        "UPDATE keys SET held = held - ?, spent = spent + ? WHERE id = ?",
        [(held, spent, key) for key, (held, spent) in by_key.items()],
    )
    conn.executemany("INSERT INTO postings (transfer_id, account_id, amount) VALUES (?, ?, ?)", postings)
    conn.executemany(
        "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, "
        "balance_after, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        charges,
    )
    return outcomes
