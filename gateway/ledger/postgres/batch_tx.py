"""One group-commit batch as one transaction (``PostgresBatchTx._tx_batch``): one statement inserts
the new holds and takes every lock in the one global order (``_LOCK_BATCH``); each operation is
checked in arrival order, in Python, against the rows the batch locked (``_batch_hold``,
``_batch_capture``, ``_batch_void``); one statement writes the outcome set-wise (``_WRITE_BATCH``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.errors import Conflict, GatewayError, IdempotencyConflict, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, Charge, HoldOutcome, HoldRequest, HoldState, HoldStatus, charge_id_for
from gateway.ledger.postgres.common import (
    _CHARGE_COLUMNS,
    _HOLD_FIELDS,
    Conn,
    Row,
    _CaptureOp,
    _HoldOp,
    _Op,
    _RaceLost,
    _RenewOp,
    _VoidOp,
)
from gateway.ledger.postgres.single import PostgresSingle
from gateway.ledger.rows import balance_limit_error, within_balance_limit
from gateway.ledger.rows import charge as _charge
from gateway.money import format_cents


@dataclass(slots=True)
class _Balance:
    """An account row locked by the batch, as the batch's operations change it."""

    kind: str
    name: str
    balance: int
    held: int
    d_balance: int = 0
    d_held: int = 0

    @property
    def available(self) -> int:
        return self.balance - self.held

    def add(self, balance: int, held: int) -> None:
        self.balance += balance
        self.held += held
        self.d_balance += balance
        self.d_held += held


@dataclass(slots=True)
class _KeyCap:
    """A key row locked by the batch (its spending cap), as the batch's operations change it."""

    spend_limit: int | None
    spent: int
    held: int
    d_spent: int = 0
    d_held: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.spend_limit is None else self.spend_limit - self.spent - self.held

    def add(self, spent: int, held: int) -> None:
        self.spent += spent
        self.held += held
        self.d_spent += spent
        self.d_held += held


@dataclass(slots=True)
class _HoldRow:
    """A hold row locked (or inserted) by the batch."""

    key_id: str | None
    user_id: int
    developer_id: int
    amount: int
    fee: int
    state: str
    charge_id: str | None
    server: str
    method: str
    name: str


@dataclass(slots=True)
class _Writes:
    """Everything a batch writes, gathered while its operations are checked, written set-wise."""

    refused: list[str] = field(default_factory=list)  # holds inserted, then refused: deleted again
    transfers: list[tuple[str, int, str, int]] = field(default_factory=list)  # id, amount, reference, user
    postings: list[tuple[str, int, int]] = field(default_factory=list)  # transfer, account, amount
    charges: list[tuple[str, str, int, int, int, int, int]] = field(default_factory=list)
    settled: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # call id -> (state, charge id)
    leases: dict[str, float] = field(default_factory=dict)  # call id -> new lease expiry


# A batch's reads and locks, in one statement and in the one global lock order (UNION ALL runs its
# branches in order, and an InitPlan runs before its node returns a row):
#   r    the new holds ($1-$11) with their user, developer and key owner resolved;
#   h    (branch 1) the existing holds the batch settles, replays or renews ($13), locked in call id order;
#   ins  the new holds whose parties resolve, inserted in call id order (a conflict means a replay;
#        a concurrent insert of the same call id is waited for), run by the InitPlan of ``a`` before
#        ``a`` locks its first account row;
#   a    (branch 2) accounts locked in id order: the users of the new holds, $14, the user of every
#        pending hold the batch settles ($15) and the developer of every one it captures ($16);
#   k    (branch 3) keys locked in id order: those of the new holds and of the pending holds it settles;
#   (branch 4) each new hold's resolved parties, and whether it was inserted.
_LOCK_BATCH = """
WITH r AS MATERIALIZED (
    SELECT r.n, r.call_id, r.key_id, r.server, r.method, r.name, r.amount, r.fee, r.owner, r.lease_s,
           u.id AS user_id, d.id AS developer_id, k.user_account_id AS key_owner
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[],
                $9::bigint[], $10::text[], $11::float8[])
         WITH ORDINALITY AS r (call_id, key_id, u, d, server, method, name, amount, fee, owner, lease_s, n)
    LEFT JOIN accounts u ON u.kind = 'user' AND u.name = r.u
    LEFT JOIN accounts d ON d.kind = 'developer' AND d.name = r.d
    LEFT JOIN keys k ON k.id = r.key_id
), ins AS (
    INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee,
                       owner, created_at, lease_expires_at)
    SELECT call_id, key_id, user_id, developer_id, server, method, name, amount, fee, owner, $12, $12 + lease_s
    FROM r
    WHERE user_id IS NOT NULL AND developer_id IS NOT NULL AND (key_id IS NULL OR key_owner = user_id)
    ORDER BY call_id
    ON CONFLICT (call_id) DO NOTHING
    RETURNING call_id, user_account_id
), h AS (
    SELECT call_id, key_id, user_account_id, developer_account_id, amount, fee, state, charge_id, server, method, name
    FROM holds WHERE call_id = ANY($13::text[]) ORDER BY call_id FOR NO KEY UPDATE
), a AS (
    SELECT id, kind, name, balance, held FROM accounts
    WHERE id = ANY(ARRAY(
        SELECT user_account_id FROM ins
        UNION SELECT user_id FROM r WHERE user_id IS NOT NULL
        UNION SELECT unnest($14::bigint[])
        UNION SELECT user_account_id FROM h WHERE state = 'pending' AND call_id = ANY($15::text[])
        UNION SELECT developer_account_id FROM h WHERE state = 'pending' AND call_id = ANY($16::text[])))
    ORDER BY id FOR NO KEY UPDATE
), k AS (
    SELECT id, spend_limit, spent, held FROM keys
    WHERE id = ANY(ARRAY(
        SELECT key_id FROM r WHERE key_id IS NOT NULL
        UNION SELECT key_id FROM h WHERE state = 'pending' AND call_id = ANY($15::text[]) AND key_id IS NOT NULL))
    ORDER BY id FOR NO KEY UPDATE
)
SELECT 1, call_id, key_id, user_account_id, developer_account_id, amount, fee, state, charge_id, server, method, name
FROM h
UNION ALL SELECT 2, name, kind, id, balance, held, NULL, NULL, NULL, NULL, NULL, NULL FROM a
UNION ALL SELECT 3, id, NULL, spend_limit, spent, held, NULL, NULL, NULL, NULL, NULL, NULL FROM k
UNION ALL SELECT 4, r.call_id, NULL, r.user_id, r.developer_id, r.key_owner, r.n, i.call_id, NULL, NULL, NULL, NULL
FROM r LEFT JOIN ins i ON i.call_id = r.call_id
"""
# Everything a batch writes, in one statement: refused holds deleted again, charge transfers, hold
# transitions and lease renewals, postings, charges, then each changed account and key once with its
# summed deltas. Foreign keys between these rows are checked at the end of the statement.
# $27 = 'off' for a batch of holds, voids and renewals only (not forced to disk), NULL otherwise.
_WRITE_BATCH = """
WITH refused AS (
    DELETE FROM holds WHERE call_id = ANY($1::text[])
), transfer AS (
    INSERT INTO transfers (id, kind, amount, reference, account_id, created_at)
    SELECT t.id, 'charge', t.amount, t.reference, t.account_id, $2
    FROM unnest($3::text[], $4::bigint[], $5::text[], $6::bigint[]) WITH ORDINALITY
         AS t (id, amount, reference, account_id, n)
    ORDER BY t.n
), hold AS (
    UPDATE holds h SET state = COALESCE(v.state, h.state), charge_id = COALESCE(v.charge_id, h.charge_id),
        settled_at = CASE WHEN v.state IS NULL THEN h.settled_at ELSE $2 END,
        lease_expires_at = COALESCE(v.lease, h.lease_expires_at)
    FROM unnest($7::text[], $8::text[], $9::text[], $10::float8[]) AS v (call_id, state, charge_id, lease)
    WHERE h.call_id = v.call_id
), posting AS (
    INSERT INTO postings (transfer_id, account_id, amount)
    SELECT p.t, p.a, p.m FROM unnest($11::text[], $12::bigint[], $13::bigint[]) WITH ORDINALITY AS p (t, a, m, n)
    ORDER BY p.n
), charge AS (
    INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, balance_after, created_at)
    SELECT c.id, c.call_id, c.u, c.d, c.amount, c.fee, c.after, $2
    FROM unnest($14::text[], $15::text[], $16::bigint[], $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[])
         WITH ORDINALITY AS c (id, call_id, u, d, amount, fee, after, n)
    ORDER BY c.n
), account AS (
    UPDATE accounts a SET balance = a.balance + v.b, held = a.held + v.h
    FROM unnest($21::bigint[], $22::bigint[], $23::bigint[]) AS v (id, b, h) WHERE a.id = v.id
), key AS (
    UPDATE keys k SET held = k.held + v.h, spent = k.spent + v.s
    FROM unnest($24::text[], $25::bigint[], $26::bigint[]) AS v (id, h, s) WHERE k.id = v.id
)
SELECT CASE WHEN $27::text IS NULL THEN NULL ELSE set_config('synchronous_commit', $27::text, true) END
"""


class PostgresBatchTx(PostgresSingle):
    """A group-commit batch as one transaction: lock, check each operation in turn, write set-wise."""

    async def _tx_batch(self, conn: Conn, batch: Sequence[_Op]) -> list[tuple[bool, Any]]:
        """One batch as one transaction; each operation's (ok, result or exception), in order.

        One statement (``_LOCK_BATCH``) inserts the new holds and locks, in the one global order,
        the keyed rows (the existing holds the batch settles, replays or renews, ``FOR NO KEY
        UPDATE`` in call id order; the new holds, inserted in call id order), then accounts by id,
        then keys by id. Balances, held amounts and spending caps are read from the locked rows;
        every guard is checked per operation, in arrival order, in Python; then everything is
        written in one statement (``_WRITE_BATCH``): one UPDATE per changed account or key row with
        its summed deltas, one multi-row INSERT per table, refused holds deleted again.

        A batch without a capture commits with ``synchronous_commit = off``: its holds, voids and
        lease renewals are visible to every replica once it commits, but not forced to disk (a crash
        voids them anyway). A batch with a capture commits durably before any caller is answered.
        Round trips: BEGIN, ``_LOCK_BATCH``, ``_WRITE_BATCH``, COMMIT (and a read of the earlier
        charges when a capture is repeated)."""
        now = self._clock()
        results: dict[int, tuple[bool, Any]] = {}
        reqs = [(i, op.req) for i, op in enumerate(batch) if isinstance(op, _HoldOp)]
        lock_calls: set[str] = {req.call_id for _, req in reqs}  # a new hold's call id may be a replay
        settle_calls: set[str] = set()
        capture_calls: set[str] = set()
        for op in batch:
            if isinstance(op, _CaptureOp):
                capture_calls.add(op.call_id)
            elif isinstance(op, _VoidOp):
                settle_calls.add(op.call_id)
            elif isinstance(op, _RenewOp):
                lock_calls.update(op.call_ids)
        settle_calls |= capture_calls
        lock_calls |= settle_calls

        # 1. one statement: insert the new holds, lock the holds, accounts and keys the batch touches
        holds: dict[str, _HoldRow] = {}
        accounts: dict[int, _Balance] = {}
        keys: dict[str, _KeyCap] = {}
        resolved: dict[int, Row] = {}  # position in ``reqs`` -> (user id, developer id, key owner, inserted)
        for r in await conn.fetch(
            _LOCK_BATCH,
            *([getattr(req, name) for _, req in reqs] for name in _HOLD_FIELDS),
            [float(req.lease_s) for _, req in reqs],
            now,
            sorted(lock_calls),
            [self._system[AccountKind.PLATFORM_FEE]] if capture_calls else [],
            sorted(settle_calls),
            sorted(capture_calls),
        ):
            if r[0] == 1:
                holds[r[1]] = _HoldRow(r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11])
            elif r[0] == 2:
                accounts[r[3]] = _Balance(r[2], r[1], int(r[4]), int(r[5]))
            elif r[0] == 3:
                keys[r[1]] = _KeyCap(None if r[3] is None else int(r[3]), int(r[4]), int(r[5]))
            else:
                resolved[int(r[6]) - 1] = r
        inserted: set[str] = set()
        parties: dict[int, tuple[int, int]] = {}
        for n, (i, req) in enumerate(reqs):
            row = resolved[n]
            if row[7] is not None:
                inserted.add(req.call_id)
                parties[i] = (int(row[3]), int(row[4]))
                continue
            try:  # not inserted: a replay, or a user, developer or key that does not resolve
                parties[i] = self._check_parties(req, (row[3], row[4], row[5]))
            except GatewayError as exc:
                results[i] = (False, exc)

        # 2. every operation checked and applied in arrival order
        writes = _Writes()
        replayed_charges: dict[int, str] = {}
        for i, op in enumerate(batch):
            if i in results:
                continue
            value: Any = None
            try:
                if isinstance(op, _HoldOp):
                    is_new = op.req.call_id in inserted
                    value = self._batch_hold(op.req, parties[i], is_new, holds, accounts, keys, writes)
                elif isinstance(op, _CaptureOp):
                    captured = self._batch_capture(op, holds, accounts, keys, writes, now)
                    if isinstance(captured, str):
                        replayed_charges[i] = captured
                    else:
                        value = captured
                elif isinstance(op, _VoidOp):
                    value = self._batch_void(op.call_id, holds, accounts, keys, writes)
                else:
                    expires = now + op.lease_s
                    for call_id in op.call_ids:
                        hold = holds.get(call_id)
                        if hold is not None and hold.state == HoldState.PENDING:
                            writes.leases[call_id] = expires
            except GatewayError as exc:
                results[i] = (False, exc)
            else:
                results[i] = (True, value)

        # 3. the writes, then the charges that replayed captures return
        await self._write_batch(conn, writes, accounts, keys, now, durable=bool(capture_calls))
        if replayed_charges:
            rows = await conn.fetch(
                f"SELECT {_CHARGE_COLUMNS} WHERE c.id = ANY($1::text[])", sorted(set(replayed_charges.values()))
            )
            by_id = {row[0]: _charge(row) for row in rows}
            for i, charge_id in replayed_charges.items():
                results[i] = (True, replace(by_id[charge_id], replayed=True))
        return [results[i] for i in range(len(batch))]

    @staticmethod
    def _batch_hold(
        req: HoldRequest,
        parties: tuple[int, int],
        is_new: bool,
        holds: dict[str, _HoldRow],
        accounts: dict[int, _Balance],
        keys: dict[str, _KeyCap],
        writes: _Writes,
    ) -> HoldOutcome:
        """``hold``'s checks and outcome (see ``_reserve``), against the batch's locked rows."""
        user_id, developer_id = parties
        account = accounts[user_id]
        key = None if req.key_id is None else keys[req.key_id]
        remaining = None if key is None else key.remaining
        if not is_new:
            stored = holds.get(req.call_id)
            if stored is None:  # committed after this statement's snapshot was taken: run the batch again
                raise _RaceLost
            if (stored.user_id, stored.developer_id, stored.server, stored.name, stored.amount) != (
                user_id,
                developer_id,
                req.server,
                req.name,
                req.amount,
            ):
                raise IdempotencyConflict(
                    f"call id {req.call_id!r} was already used for a different user, developer, server, name or amount"
                )
            return HoldOutcome(HoldStatus.REPLAYED, available=account.available, spend_remaining=remaining)
        if account.available < req.amount:
            writes.refused.append(req.call_id)
            return HoldOutcome(HoldStatus.INSUFFICIENT_FUNDS, available=account.available, spend_remaining=remaining)
        if key is not None and key.spend_limit is not None and key.spent + key.held + req.amount > key.spend_limit:
            writes.refused.append(req.call_id)
            return HoldOutcome(HoldStatus.SPEND_LIMIT, available=account.available, spend_remaining=remaining)
        account.add(0, req.amount)
        if key is not None:
            key.add(0, req.amount)
        holds[req.call_id] = _HoldRow(
            req.key_id,
            user_id,
            developer_id,
            req.amount,
            req.fee,
            HoldState.PENDING,
            None,
            req.server,
            req.method,
            req.name,
        )
        return HoldOutcome(
            HoldStatus.OK, available=account.available, spend_remaining=None if key is None else key.remaining
        )

    def _batch_capture(
        self,
        op: _CaptureOp,
        holds: dict[str, _HoldRow],
        accounts: dict[int, _Balance],
        keys: dict[str, _KeyCap],
        writes: _Writes,
        now: float,
    ) -> Charge | str:
        """``_tx_capture`` against the batch's locked rows: the new Charge, or the id of the charge an
        earlier capture of the call made."""
        call_id = op.call_id
        hold = holds.get(call_id)
        if hold is None:
            raise NotFound(f"no hold for call {call_id!r}")
        if hold.state == HoldState.CAPTURED:
            assert hold.charge_id is not None
            return hold.charge_id
        if hold.state == HoldState.VOIDED:
            raise Conflict(f"the hold for call {call_id!r} was voided; it cannot be captured")
        amount = hold.amount if op.amount is None else op.amount
        if amount > hold.amount:
            raise InvalidInput(
                f"cannot capture {format_cents(amount)} cents: the hold for call {call_id!r} "
                f"reserved only {format_cents(hold.amount)}"
            )
        fee = hold.fee * amount // hold.amount
        platform = self._system[AccountKind.PLATFORM_FEE]
        legs = [(hold.user_id, -amount), (hold.developer_id, amount - fee), (platform, fee)]
        user, developer = accounts[hold.user_id], accounts[hold.developer_id]
        # the guard of _post: no leg may take an account's available balance below zero; the user's is
        # not checked: releasing the hold and debiting at most its amount never lowers it (it may be
        # below zero already, after a clawback, and the capture still stands)
        if any(accounts[account].available + value < 0 for account, value in legs[1:]):
            raise Conflict(f"the ledger refused a capture of call {call_id!r} that would overdraw an account")
        # nor any balance past MAX_BALANCE (the user's only falls); exact: Python integers do not overflow
        for account_id, value in legs[1:]:
            account = accounts[account_id]
            if not within_balance_limit(account.balance + value):
                raise balance_limit_error(account.kind, account.name, account.balance, value)
        user.add(-amount, -hold.amount)
        developer.add(amount - fee, 0)
        accounts[platform].add(fee, 0)
        if hold.key_id is not None:
            keys[hold.key_id].add(amount, -hold.amount)
        charge_id = charge_id_for(call_id)
        hold.state, hold.charge_id = HoldState.CAPTURED, charge_id
        balance_after = user.available
        writes.transfers.append((charge_id, amount, call_id, hold.user_id))
        writes.postings.extend((charge_id, account, value) for account, value in legs if value != 0)
        writes.charges.append((charge_id, call_id, hold.user_id, hold.developer_id, amount, fee, balance_after))
        writes.settled[call_id] = (HoldState.CAPTURED, charge_id)
        return Charge.captured(
            call_id,
            user=user.name,
            developer=developer.name,
            server=hold.server,
            method=hold.method,
            name=hold.name,
            amount=amount,
            fee=fee,
            now=now,
            balance_after=balance_after,
        )

    @staticmethod
    def _batch_void(
        call_id: str,
        holds: dict[str, _HoldRow],
        accounts: dict[int, _Balance],
        keys: dict[str, _KeyCap],
        writes: _Writes,
    ) -> bool:
        hold = holds.get(call_id)
        if hold is None or hold.state != HoldState.PENDING:
            return False
        accounts[hold.user_id].add(0, -hold.amount)
        if hold.key_id is not None:
            keys[hold.key_id].add(0, -hold.amount)
        hold.state = HoldState.VOIDED
        writes.settled[call_id] = (HoldState.VOIDED, None)
        return True

    @staticmethod
    async def _write_batch(
        conn: Conn,
        writes: _Writes,
        accounts: dict[int, _Balance],
        keys: dict[str, _KeyCap],
        now: float,
        *,
        durable: bool,
    ) -> None:
        """Write what a batch decided, in one statement (``_WRITE_BATCH``)."""
        changed = sorted(writes.settled.keys() | writes.leases.keys())
        moved = sorted((account_id, a) for account_id, a in accounts.items() if a.d_balance or a.d_held)
        capped = sorted((key_id, k) for key_id, k in keys.items() if k.d_spent or k.d_held)
        if not (writes.refused or writes.transfers or changed or moved or capped):
            return  # nothing changed (a replay, a refused void): nothing to commit but row locks
        settled = [writes.settled.get(call_id) for call_id in changed]
        await conn.execute(
            _WRITE_BATCH,
            writes.refused,
            now,
            *([t[j] for t in writes.transfers] for j in range(4)),
            changed,
            [None if s is None else s[0] for s in settled],
            [None if s is None else s[1] for s in settled],
            [writes.leases.get(call_id) for call_id in changed],
            *([p[j] for p in writes.postings] for j in range(3)),
            *([c[j] for c in writes.charges] for j in range(7)),
            [account_id for account_id, _ in moved],
            [a.d_balance for _, a in moved],
            [a.d_held for _, a in moved],
            [key_id for key_id, _ in capped],
            [k.d_held for _, k in capped],
            [k.d_spent for _, k in capped],
            None if durable else "off",
        )
