"""The PostgreSQL ledger (asyncpg).

Same semantics as the SQLite ledger (``sqlite.py``); what differs is how the database keeps them
under concurrency from many connections and gateway replicas:

* Every money operation is one transaction at READ COMMITTED. Balance and spending-cap guards are
  conditional ``UPDATE … WHERE balance - held >= $a``: a blocked ``UPDATE`` re-checks the newest
  row version once the lock is released, so concurrent holds can never overspend and need no
  retry. ``CHECK`` constraints back every guard.
* Row locks are always taken in one order: the keyed row (hold, charge or payout), then accounts by
  ascending id (``_lock_accounts``, ``FOR NO KEY UPDATE`` so foreign-key checks are not blocked),
  then keys by id. No two ledger transactions wait on each other in a cycle.
* Idempotency lives in unique keys: ``INSERT … ON CONFLICT DO NOTHING`` and then read the winner.
  A transaction that loses such a race is rolled back and run again, and the re-run sees the
  winner (``_RaceLost``).
* A whole transaction is re-run on serialization_failure / deadlock_detected only when it is
  idempotent by its key (hold, capture, charge, void, renew, sweep, keyed top-ups and refunds,
  payout transitions); for the others the caller gets ``Unavailable`` and nothing was written.
  Nothing is ever replayed after a lost connection: the outcome of a COMMIT whose reply never
  arrived is unknown, so the caller gets ``Unavailable`` (and retries with its idempotency key).
* Group commit: the holds, captures, voids and lease renewals one process issues concurrently are
  queued and committed together, a batch per transaction (``_submit``, ``_tx_batch``), so a busy
  user's account row is locked and committed once per batch instead of once per call. The batch
  takes its locks in the same global order (holds by call id, accounts by id, keys by id), reads
  balances and caps from the locked rows, checks each operation on its own in arrival order, and
  writes the outcome set-wise (one UPDATE per changed account or key with its summed deltas). A
  batch of holds, voids and renewals only commits with ``synchronous_commit = off`` (visible to
  every replica at once, not forced to disk: a crash voids those holds anyway); a batch with a
  capture commits durably before any of its callers is answered. A batch of one (a lone caller)
  is one auto-commit statement instead: a session-local function with the same locks, checks and
  writes (``_LONE_FUNCTIONS``, ``_run_lone``).
* ``verify`` reads every invariant from one REPEATABLE READ, READ ONLY snapshot.
* ``sweep`` claims lapsed holds with ``FOR UPDATE SKIP LOCKED``, so replicas sweeping at once void
  each hold exactly once without waiting on each other.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, TypeAlias, TypeVar

import asyncpg
import structlog

from gateway.errors import (
    AlreadyExists,
    BalanceLimitExceeded,
    Conflict,
    GatewayError,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    Unavailable,
)
from gateway.ledger.base import (
    EXPORT_COLUMNS,
    EXPORT_TABLES,
    MAX_BALANCE,
    Account,
    AccountKind,
    Charge,
    ChargeResult,
    Earnings,
    EarningsBreakdown,
    ExportRow,
    HoldInfo,
    HoldOutcome,
    HoldRequest,
    HoldState,
    HoldStatus,
    KeyRecord,
    Payout,
    PayoutState,
    ServiceToken,
    StatementLine,
    Transfer,
    UsageRow,
    UserSummary,
    charge_id_for,
)
from gateway.ledger.dump import check_row
from gateway.ledger.migrations_postgres import BALANCE_LIMIT_CONSTRAINT, MIGRATIONS, SCHEMA_MIGRATIONS_TABLE
from gateway.ledger.rows import HOLD_INSERT_COLUMNS, balance_limit_error, hold_row, within_balance_limit
from gateway.ledger.rows import charge as _charge
from gateway.ledger.rows import hold_info as _hold_info
from gateway.ledger.rows import key_record as _key_record
from gateway.ledger.rows import payout as _payout
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_limit as _require_limit
from gateway.ledger.rows import require_name as _require_name
from gateway.money import format_cents

T = TypeVar("T")
Conn: TypeAlias = "asyncpg.Connection[Any]"
Row: TypeAlias = asyncpg.Record

SYSTEM_NAME = "system"
_SYSTEM_KINDS = (AccountKind.WORLD, AccountKind.PLATFORM_FEE, AccountKind.PAYOUT_CLEARING)
# pg_advisory_xact_lock(classid, objid): classid says "AgentPay ledger migrations", objid is the schema.
_MIGRATION_LOCK_CLASS = 0x41504C47
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MAX_ATTEMPTS = 6
ACQUIRE_TIMEOUT_S = 10.0
SETTLE_POOL_SIZE = 4  # connections reserved for the group-commit batches (holds, captures, voids, renewals)
MAX_BATCH = 512  # most hold/capture/void/renew operations committed in one transaction
BATCH_WORKERS = 1  # batches of one process in flight at once (each on its own connection)
DRAIN_ON_CLOSE_S = 10.0  # close() lets queued operations finish for this long

_KEY_COLUMNS = """
    k.id, a.name, k.server, k.prefix, k.created_at, k.expires_at, k.revoked_at,
    k.spend_limit, k.spent, k.held
    FROM keys k JOIN accounts a ON a.id = k.user_account_id
"""
_CHARGE_COLUMNS = """
    c.id, c.call_id, u.name, d.name, h.server, h.method, h.name, c.amount, c.fee, c.refunded,
    c.created_at, c.balance_after
    FROM charges c
    JOIN holds h ON h.call_id = c.call_id
    JOIN accounts u ON u.id = c.user_account_id
    JOIN accounts d ON d.id = c.developer_account_id
"""
_HOLD_COLUMNS = """
    h.call_id, u.name, d.name, h.server, h.method, h.name, h.amount, h.fee, h.state, h.created_at,
    h.lease_expires_at, h.charge_id
    FROM holds h
    JOIN accounts u ON u.id = h.user_account_id
    JOIN accounts d ON d.id = h.developer_account_id
"""
_TOKEN_COLUMNS = """
    t.id, a.name, t.servers, t.prefix, t.created_at, t.revoked_at
    FROM service_tokens t JOIN accounts a ON a.id = t.developer_account_id
"""
_PAYOUT_COLUMNS = """
    p.id, a.name, p.amount, p.state, p.reference, p.created_at, p.completed_at, p.developer_account_id
    FROM payouts p JOIN accounts a ON a.id = p.developer_account_id
"""

# export_rows: one query per table, columns in EXPORT_COLUMNS order, rows in dependency order (a
# refund after the charge it names; charges in insertion order, ``seq``).
_EXPORT_QUERIES: dict[str, str] = {
    "accounts": "SELECT id, kind, name, balance, held, created_at FROM accounts ORDER BY id",
    "transfers": "SELECT id, kind, amount, reference, account_id, charge_id, created_at FROM transfers "
    "ORDER BY charge_id IS NOT NULL, created_at, id",
    "postings": "SELECT id, transfer_id, account_id, amount FROM postings ORDER BY id",
    "keys": "SELECT id, user_account_id, server, key_hash, prefix, created_at, expires_at, revoked_at, "
    "spend_limit, spent, held FROM keys ORDER BY created_at, id",
    "holds": "SELECT call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee, "
    "state, owner, created_at, lease_expires_at, settled_at, charge_id FROM holds ORDER BY created_at, call_id",
    "charges": "SELECT id, call_id, user_account_id, developer_account_id, amount, fee, refunded, balance_after, "
    "created_at FROM charges ORDER BY seq",
    "service_tokens": "SELECT id, developer_account_id, servers, token_hash, prefix, created_at, revoked_at "
    "FROM service_tokens ORDER BY created_at, id",
    "payouts": "SELECT id, developer_account_id, amount, state, reference, transfer_id, created_at, completed_at "
    "FROM payouts ORDER BY created_at, id",
}

# The connection is gone or the server refuses work: the outcome of an in-flight COMMIT is unknown.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08, including ConnectionDoesNotExistError
    asyncpg.exceptions.OperatorInterventionError,  # 57: admin shutdown (pg_terminate_backend), cancel
    asyncpg.exceptions.InsufficientResourcesError,  # 53: too many connections, disk full
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.exceptions.InternalClientError,  # e.g. "cannot switch to state 15" releasing a killed connection
    OSError,
    TimeoutError,
)
_RETRYABLE = (asyncpg.exceptions.SerializationError, asyncpg.exceptions.DeadlockDetectedError)
# The server gave up waiting (lock_timeout, statement_timeout) and rolled the transaction back.
_TIMED_OUT = (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.QueryCanceledError)

log = structlog.get_logger("gateway.ledger.postgres")


class _Rollback(Exception):
    """Raised inside a transaction to roll it back and still return ``result``."""

    def __init__(self, result: object) -> None:
        super().__init__("rollback")
        self.result = result


class _RaceLost(Exception):
    """A concurrent transaction committed the same idempotency key first: roll back and re-run
    (the re-run reads the winner)."""


class _WouldGoNegative(Exception):
    def __init__(self, account_id: int) -> None:
        super().__init__(f"account {account_id} would go negative")
        self.account_id = account_id


# --- group commit: the operations a batch carries ------------------------------------------------
@dataclass(eq=False, slots=True)
class _HoldOp:
    req: HoldRequest
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _CaptureOp:
    call_id: str
    amount: int | None
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _VoidOp:
    call_id: str
    future: asyncio.Future[Any]


@dataclass(eq=False, slots=True)
class _RenewOp:
    call_ids: tuple[str, ...]
    lease_s: float
    future: asyncio.Future[Any]


_Op: TypeAlias = _HoldOp | _CaptureOp | _VoidOp | _RenewOp


def _call_of(op: _Op) -> str | None:
    """The call id an operation settles, or None for a renewal (renewals never conflict: they extend
    whatever is still pending when they run)."""
    if isinstance(op, _HoldOp):
        return op.req.call_id
    if isinstance(op, _RenewOp):
        return None
    return op.call_id


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


_HOLD_FIELDS = ("call_id", "key_id", "user", "developer", "server", "method", "name", "amount", "fee", "owner")
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


# A batch of ONE hold, capture or void (what a lone caller sends) runs as one auto-commit statement
# instead of BEGIN, ``_LOCK_BATCH``, ``_WRITE_BATCH``, COMMIT: a call of one of these functions,
# which take the same locks in the same global order (the hold row, then accounts by id, then the
# key) and make the same checks and writes as the batch path. They are session-local (``pg_temp``,
# created by ``_prepare_settle_connection`` on every connection of the settle pool): no schema change.
# Each returns NULLs having written nothing when the operation is not the plain case (a replay, a
# settled hold, a party that does not resolve, a hold over its key's cap, a capture that would
# overdraw); the batch path then answers it. A hold or void commits with ``synchronous_commit =
# off`` (as their batches do; a crash voids those holds anyway), a capture with the session's
# (durable) setting. The names carry a
# version (``_v1``): change a body, change the name, so a server connection reused across gateway
# versions (a pooler) never runs another version's body. The hold's columns are those of
# ``rows.HOLD_INSERT_COLUMNS``, and ``tests/ledger/test_postgres_lone.py`` holds all three paths
# (these functions, ``_batch_*``, ``_tx_*``) to the SQLite store's outcomes.
_LONE_FUNCTIONS = """
CREATE OR REPLACE FUNCTION pg_temp.agentpay_hold_v1(
    p_call_id text, p_key_id text, p_user text, p_developer text, p_server text, p_method text, p_name text,
    p_amount bigint, p_fee bigint, p_owner text, p_now double precision, p_lease_s double precision,
    OUT o_status text, OUT o_available bigint, OUT o_spend_remaining bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_user bigint;
    v_developer bigint;
    v_key_owner bigint;
    v_over_cap boolean := false;
BEGIN
    SELECT id INTO v_user FROM accounts WHERE kind = 'user' AND name = p_user;
    SELECT id INTO v_developer FROM accounts WHERE kind = 'developer' AND name = p_developer;
    IF p_key_id IS NOT NULL THEN
        SELECT user_account_id, spend_limit IS NOT NULL AND spent + held + p_amount > spend_limit
        INTO v_key_owner, v_over_cap FROM keys WHERE id = p_key_id;
    END IF;
    IF v_user IS NULL OR v_developer IS NULL OR (p_key_id IS NOT NULL AND v_key_owner IS DISTINCT FROM v_user) THEN
        RETURN;  -- nothing written: the batch path names what does not resolve
    END IF;
    IF v_over_cap THEN
        RETURN;  -- the key's cap refuses it already (unlocked read): the batch path refuses it writing nothing
    END IF;
    INSERT INTO holds (call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee,
                       owner, created_at, lease_expires_at)
    VALUES (p_call_id, p_key_id, v_user, v_developer, p_server, p_method, p_name, p_amount, p_fee, p_owner, p_now,
            p_now + p_lease_s)
    ON CONFLICT (call_id) DO NOTHING;
    IF NOT FOUND THEN
        RETURN;  -- nothing written: a replay, answered by the batch path
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE accounts SET held = held + p_amount WHERE id = v_user AND balance - held >= p_amount
    RETURNING balance - held INTO o_available;
    IF NOT FOUND THEN
        DELETE FROM holds WHERE call_id = p_call_id;
        SELECT balance - held INTO o_available FROM accounts WHERE id = v_user;
        SELECT spend_limit - spent - held INTO o_spend_remaining FROM keys WHERE id = p_key_id;
        o_status := 'insufficient_funds';
        RETURN;
    END IF;
    IF p_key_id IS NOT NULL THEN
        UPDATE keys SET held = held + p_amount
        WHERE id = p_key_id AND (spend_limit IS NULL OR spent + held + p_amount <= spend_limit)
        RETURNING spend_limit - spent - held INTO o_spend_remaining;
        IF NOT FOUND THEN
            UPDATE accounts SET held = held - p_amount WHERE id = v_user;
            DELETE FROM holds WHERE call_id = p_call_id;
            o_available := o_available + p_amount;
            SELECT spend_limit - spent - held INTO o_spend_remaining FROM keys WHERE id = p_key_id;
            o_status := 'spend_limit';
            RETURN;
        END IF;
    END IF;
    o_status := 'ok';
END;
$$;

CREATE OR REPLACE FUNCTION pg_temp.agentpay_capture_v1(
    p_call_id text, p_amount bigint, p_now double precision, p_platform bigint,
    OUT o_status text, OUT o_user text, OUT o_developer text, OUT o_server text, OUT o_method text,
    OUT o_name text, OUT o_amount bigint, OUT o_fee bigint, OUT o_balance_after bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_hold record;
    v_charge text := 'ch_' || p_call_id;
    v_user_available bigint;
    v_developer_available bigint;
    v_platform_available bigint;
    v_account record;
BEGIN
    SELECT key_id, user_account_id, developer_account_id, amount, fee, state, server, method, name INTO v_hold
    FROM holds WHERE call_id = p_call_id FOR NO KEY UPDATE;
    IF NOT FOUND OR v_hold.state <> 'pending' THEN
        RETURN;  -- nothing written: no such hold, or already settled (the batch path answers)
    END IF;
    o_amount := COALESCE(p_amount, v_hold.amount);
    IF o_amount > v_hold.amount THEN
        RETURN;
    END IF;
    o_fee := div(v_hold.fee::numeric * o_amount, v_hold.amount::numeric)::bigint;
    FOR v_account IN
        SELECT id, name, balance - held AS available FROM accounts
        WHERE id IN (v_hold.user_account_id, v_hold.developer_account_id, p_platform)
        ORDER BY id FOR NO KEY UPDATE
    LOOP
        IF v_account.id = v_hold.user_account_id THEN
            o_user := v_account.name;
            v_user_available := v_account.available;
        ELSIF v_account.id = v_hold.developer_account_id THEN
            o_developer := v_account.name;
            v_developer_available := v_account.available;
        ELSE
            v_platform_available := v_account.available;
        END IF;
    END LOOP;
    IF v_user_available + v_hold.amount - o_amount < 0 OR v_developer_available + o_amount - o_fee < 0
       OR v_platform_available + o_fee < 0 THEN
        RETURN;  -- would overdraw: nothing written, the batch path refuses it
    END IF;
    o_balance_after := v_user_available + v_hold.amount - o_amount;
    INSERT INTO transfers (id, kind, amount, reference, account_id, created_at)
    VALUES (v_charge, 'charge', o_amount, p_call_id, v_hold.user_account_id, p_now);
    UPDATE holds SET state = 'captured', charge_id = v_charge, settled_at = p_now WHERE call_id = p_call_id;
    INSERT INTO postings (transfer_id, account_id, amount)
    SELECT v_charge, leg.account, leg.amount
    FROM (VALUES (1, v_hold.user_account_id, -o_amount), (2, v_hold.developer_account_id, o_amount - o_fee),
                 (3, p_platform, o_fee)) AS leg (n, account, amount)
    WHERE leg.amount <> 0 ORDER BY leg.n;
    UPDATE accounts SET balance = balance - o_amount, held = held - v_hold.amount WHERE id = v_hold.user_account_id;
    IF o_amount - o_fee <> 0 THEN
        UPDATE accounts SET balance = balance + (o_amount - o_fee) WHERE id = v_hold.developer_account_id;
    END IF;
    IF o_fee <> 0 THEN
        UPDATE accounts SET balance = balance + o_fee WHERE id = p_platform;
    END IF;
    IF v_hold.key_id IS NOT NULL THEN
        UPDATE keys SET held = held - v_hold.amount, spent = spent + o_amount WHERE id = v_hold.key_id;
    END IF;
    INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, balance_after, created_at)
    VALUES (v_charge, p_call_id, v_hold.user_account_id, v_hold.developer_account_id, o_amount, o_fee,
            o_balance_after, p_now);
    o_status := 'captured';
    o_server := v_hold.server;
    o_method := v_hold.method;
    o_name := v_hold.name;
END;
$$;

CREATE OR REPLACE FUNCTION pg_temp.agentpay_void_v1(p_call_id text, p_now double precision) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_user bigint;
    v_key text;
    v_amount bigint;
BEGIN
    UPDATE holds SET state = 'voided', settled_at = p_now WHERE call_id = p_call_id AND state = 'pending'
    RETURNING user_account_id, key_id, amount INTO v_user, v_key, v_amount;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE accounts SET held = held - v_amount WHERE id = v_user;
    IF v_key IS NOT NULL THEN
        UPDATE keys SET held = held - v_amount WHERE id = v_key;
    END IF;
    RETURN true;
END;
$$;
"""
_LONE_HOLD = "SELECT * FROM pg_temp.agentpay_hold_v1($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
_LONE_CAPTURE = "SELECT * FROM pg_temp.agentpay_capture_v1($1, $2, $3, $4)"
_LONE_VOID = "SELECT pg_temp.agentpay_void_v1($1, $2)"


def _deliver(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():  # the caller was cancelled; what the batch wrote stands
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


async def _prepare_settle_connection(conn: Conn) -> None:
    """Create the session-local functions of the lone-operation path on a new settle connection."""
    await conn.execute(_LONE_FUNCTIONS)


_NO_LONE_PATH = (asyncpg.exceptions.UndefinedFunctionError, asyncpg.exceptions.InsufficientPrivilegeError)
"""What a lone statement gets where its functions are missing (a transaction-mode pooler put it on
another server connection) or could not be made (no TEMP privilege)."""


async def _keep_session(conn: Conn) -> None:
    """Release a settle connection without the default reset query (a round trip per batch while a
    lone caller keeps the drainer acquiring and releasing): these connections set nothing at session
    level (only ``set_config(..., true)``, local to a transaction), take no advisory locks, open no
    cursors and listen to nothing. asyncpg still rolls back a transaction left open."""


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _token(row: Row) -> ServiceToken:
    return ServiceToken(
        id=row[0], developer=row[1], servers=tuple(row[2]), prefix=row[3], created_at=row[4], revoked_at=row[5]
    )


def _translate(exc: asyncpg.PostgresError) -> GatewayError:
    """A database error that escaped the guards, as a gateway error with a clear message."""
    constraint = getattr(exc, "constraint_name", None) or "?"
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists(f"the ledger already has a record with this key ({constraint})")
    if isinstance(exc, asyncpg.CheckViolationError) and constraint == BALANCE_LIMIT_CONSTRAINT:
        return BalanceLimitExceeded(f"Refused by the ledger database: a balance would leave +-{MAX_BALANCE} millicents")
    if isinstance(exc, asyncpg.CheckViolationError):
        return Conflict(f"the ledger refused a write that would break one of its rules ({constraint})")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return Conflict(f"the ledger refused a write that refers to a missing record ({constraint})")
    return GatewayError(f"ledger database error: {type(exc).__name__}: {exc}")


class PostgresLedger:
    """``Ledger`` on PostgreSQL. Any number of gateway replicas may share one database."""

    SWEEP_BATCH = 500  # holds voided per sweep transaction

    def __init__(
        self,
        dsn: str,
        *,
        clock: Callable[[], float] = time.time,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        batch_workers: int = BATCH_WORKERS,
    ) -> None:
        if schema is not None and not _SCHEMA_NAME.match(schema):
            raise InvalidInput(
                f"schema name {schema!r} must be 1-63 letters, digits or '_' (not starting with a digit)"
            )
        # < the pool: a drainer that falls back to one operation at a time takes a second connection
        if not 1 <= batch_workers < SETTLE_POOL_SIZE:
            raise InvalidInput(f"batch_workers must be between 1 and {SETTLE_POOL_SIZE - 1}, got {batch_workers!r}")
        self.dsn = dsn
        self.schema = schema
        self._clock = clock
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        # The group-commit batches (holds, captures, voids, renewals) run on connections of their
        # own, never queued behind reads or top-ups for a pooled connection.
        self._settle_pool: asyncpg.Pool | None = None
        self._lone_path = True  # off once its functions turn out to be missing: see _run_lone
        self._system: dict[AccountKind, int] = {}
        # Group commit (see ``_submit``): queued operations, the call ids of batches in flight, and
        # the tasks draining the queue (at most ``batch_workers``).
        self._batch_workers = batch_workers
        self._queue: deque[_Op] = deque()
        self._busy: set[str] = set()
        self._drainers: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is not None:
            return
        settings = {
            "application_name": "agentpay-ledger",
            "lock_timeout": "30s",
            "idle_in_transaction_session_timeout": "60s",
        }
        if self.schema is not None:
            settings["search_path"] = _quote_ident(self.schema)
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                server_settings=settings,
                timeout=ACQUIRE_TIMEOUT_S,
            )
            # The batch statements take arrays: a custom plan per execution costs more than the
            # batch itself, and the generic plan (index lookups per element) fits every size. A
            # generic plan is made once per connection, often while the tables are still small,
            # where a sequential scan looks cheapest, and then kept while the tables grow (until an
            # ANALYZE invalidates it): every lookup here is by a unique key, so never plan a scan.
            self._settle_pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=SETTLE_POOL_SIZE,
                server_settings=settings | {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off"},
                timeout=ACQUIRE_TIMEOUT_S,
                init=self._init_settle_connection,
                reset=_keep_session,
            )
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"cannot connect to the ledger database: {exc}",
                hint="Check that PostgreSQL is running and the database URL is right",
            ) from exc
        except asyncpg.PostgresError as exc:  # e.g. unknown database or role
            raise Unavailable(f"cannot open the ledger database: {exc}", hint="Check the database URL") from exc
        try:
            self._system = await self._run(self._tx_migrate, idempotent=True)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._drainers:  # let operations already queued finish (or fail) before the pools go
            _, late = await asyncio.wait(set(self._drainers), timeout=DRAIN_ON_CLOSE_S)
            for task in late:  # cancelled drainers answer their callers (Unavailable) on the way out
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        pools = (self._pool, self._settle_pool)
        self._pool = self._settle_pool = None
        for pool in pools:
            if pool is None:
                continue
            try:
                await asyncio.wait_for(pool.close(), timeout=10)
            except _CONNECTION_ERRORS:  # includes TimeoutError
                pool.terminate()

    async def __aenter__(self) -> PostgresLedger:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _tx_migrate(self, conn: Conn) -> dict[AccountKind, int]:
        """Apply missing migrations and create the system accounts, holding the schema's advisory
        lock for the whole transaction so replicas starting together apply each migration once."""
        await conn.execute("SET LOCAL lock_timeout = '120s'")
        if self.schema is not None:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", _MIGRATION_LOCK_CLASS, self.schema)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote_ident(self.schema)}")
            await conn.execute(f"SET LOCAL search_path TO {_quote_ident(self.schema)}")
        else:
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext(COALESCE(current_schema(), '')))", _MIGRATION_LOCK_CLASS
            )
        await conn.execute(SCHEMA_MIGRATIONS_TABLE)
        applied = {row[0] for row in await conn.fetch("SELECT name FROM schema_migrations")}
        for name, script in MIGRATIONS:
            if name in applied:
                continue
            await conn.execute(script)  # no arguments: the simple protocol runs every statement
            await conn.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES ($1, $2)", name, float(self._clock())
            )
        now = self._clock()
        ids: dict[AccountKind, int] = {}
        for kind in _SYSTEM_KINDS:
            await conn.execute(
                "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (kind, name) DO NOTHING",
                kind.value,
                SYSTEM_NAME,
                now,
            )
            ids[kind] = await conn.fetchval(
                "SELECT id FROM accounts WHERE kind = $1 AND name = $2", kind.value, SYSTEM_NAME
            )
        return ids

    # --- transactions ---------------------------------------------------------------------------
    @asynccontextmanager
    async def _connection(self, *, settle: bool = False) -> AsyncIterator[Conn]:
        pool = self._settle_pool if settle else self._pool
        if pool is None:
            raise Unavailable("the ledger is not open")
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
            yield conn

    async def _run(
        self,
        fn: Callable[[Conn], Awaitable[T]],
        *,
        idempotent: bool,
        isolation: str = "read_committed",
        readonly: bool = False,
        settle: bool = False,
        conn: Conn | None = None,
    ) -> T:
        """Run ``fn`` as one transaction (on ``conn`` when given, else on a pooled connection). Re-run
        it after a serialization failure or deadlock only when ``idempotent`` (see the module
        docstring); map database errors to gateway errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                if conn is not None:
                    async with conn.transaction(isolation=isolation, readonly=readonly):
                        return await fn(conn)
                async with (
                    self._connection(settle=settle) as pooled,
                    pooled.transaction(isolation=isolation, readonly=readonly),
                ):
                    return await fn(pooled)
            except _Rollback as rollback:
                return rollback.result  # type: ignore[return-value]
            except _RaceLost:
                if attempt >= MAX_ATTEMPTS:
                    raise Unavailable("the ledger kept losing an idempotency race; retry the request") from None
            except _RETRYABLE as exc:
                if not idempotent or attempt >= MAX_ATTEMPTS:
                    raise Unavailable(
                        f"the ledger database aborted the transaction ({exc.sqlstate}: {exc}); nothing was written",
                        hint="Retry the request",
                    ) from exc
            except GatewayError:
                raise
            except _TIMED_OUT as exc:
                raise Unavailable(
                    f"the ledger database is too busy ({exc.sqlstate}: {exc}); nothing was written",
                    hint="Retry shortly",
                ) from exc
            except _CONNECTION_ERRORS as exc:
                raise Unavailable(
                    f"lost the connection to the ledger database ({type(exc).__name__}: {exc})",
                    hint="Retry shortly with the same idempotency key; check that PostgreSQL is up",
                ) from exc
            except asyncpg.PostgresError as exc:
                raise _translate(exc) from exc
            await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run ``fn`` in one REPEATABLE READ, READ ONLY transaction: one consistent snapshot."""
        return await self._run(fn, idempotent=True, isolation="repeatable_read", readonly=True)

    # --- group commit of holds, captures, voids and lease renewals -------------------------------
    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op) -> Any:
        """Queue a hold, capture, void or renewal and wait for its own outcome.

        Group commit: operations that arrive while a batch is in flight wait in ``_queue``; a
        drainer task (``_drain``) takes them all as the next batch and runs it as ONE transaction
        (``_tx_batch``), so a user's account row is locked, updated and committed once per batch
        instead of once per call. Each operation is checked on its own, in arrival order, against
        the rows the batch locked, and gets exactly the result or exception it would get alone; a
        refused or failing operation writes nothing and does not disturb the others. A batch holds
        at most one operation per call id (a later one waits for the next batch), so an operation
        always sees the committed outcome of an earlier one on the same call.

        A caller cancelled before its batch starts is dropped (nothing written); once the batch has
        started, its write stands, as when a COMMIT is under way."""
        if self._settle_pool is None:
            raise Unavailable("the ledger is not open")
        self._queue.append(op)
        if len(self._drainers) < self._batch_workers:
            self._drainers.add(asyncio.get_running_loop().create_task(self._drain()))
        return await op.future

    async def _drain(self) -> None:
        """Run batches until the queue holds nothing this drainer may take, on one connection kept
        while there is work (the pool resets a connection, a round trip, each time it is released).

        The queue is checked again after the connection is released, and the drainer leaves
        ``_drainers`` with no await in between: an operation queued at any moment is either taken
        here or finds no drainer and starts one."""
        batch: list[_Op] = []
        try:
            while True:
                if not batch:
                    batch = self._take_batch()
                    if not batch:
                        return
                try:
                    async with self._connection(settle=True) as conn:
                        while batch:
                            await self._run_batch(batch, conn)
                            batch = self._take_batch()
                            if conn.is_closed():  # lost during the batch: the pool replaces it
                                break
                except GatewayError as exc:  # the ledger is not open
                    self._answer(batch, [(False, exc)] * len(batch))
                    batch = []
                except _CONNECTION_ERRORS as exc:  # no connection to be had: the batch in hand never ran
                    error = Unavailable(
                        f"cannot reach the ledger database ({type(exc).__name__}: {exc}); nothing was written",
                        hint="Retry shortly; check that PostgreSQL is up",
                    )
                    self._answer(batch, [(False, error)] * len(batch))
                    batch = []
                except BaseException:  # cancelled (closing) or a bug: nobody may wait forever, no call stays busy
                    gone = Unavailable("the ledger stopped before the operation ran; nothing was written")
                    self._answer(batch, [(False, gone)] * len(batch))  # no-op for callers already answered
                    raise
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._drainers.discard(task)

    def _take_batch(self) -> list[_Op]:
        """The next batch: queued operations in arrival order, skipping cancelled ones; an operation
        on a call id already in this batch (or in a batch in flight) stays queued, in order. Its
        call ids are busy until ``_answer``."""
        batch: list[_Op] = []
        calls: set[str] = set()
        deferred: list[_Op] = []
        while self._queue and len(batch) < MAX_BATCH:
            op = self._queue.popleft()
            if op.future.done():  # its caller was cancelled before the batch began: nothing written
                continue
            call = _call_of(op)
            if call is not None:
                if call in calls or call in self._busy:
                    deferred.append(op)
                    continue
                calls.add(call)
            batch.append(op)
        self._queue.extendleft(reversed(deferred))
        self._busy |= calls
        return batch

    def _answer(self, batch: Sequence[_Op], outcomes: Sequence[tuple[bool, Any]]) -> None:
        """Give each caller of ``batch`` its (ok, result or exception); its call ids are free again."""
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            _deliver(op.future, ok, value)
            if (call := _call_of(op)) is not None:
                self._busy.discard(call)

    async def _run_batch(self, batch: list[_Op], conn: Conn) -> None:
        """Run one batch on ``conn`` and answer each of its callers. A database error the
        per-operation checks did not foresee (a constraint, say) rolls the batch back: its
        operations are then run one transaction each, so only the operation at fault fails."""
        outcomes: list[tuple[bool, Any]] | None = None
        try:
            try:
                if len(batch) == 1 and self._lone_path:
                    outcomes = await self._run_lone(batch[0], conn)
                if outcomes is None:
                    outcomes = await self._run(lambda c: self._tx_batch(c, batch), idempotent=True, conn=conn)
            except GatewayError as exc:
                unforeseen = not isinstance(exc, Unavailable) and isinstance(exc.__cause__, asyncpg.PostgresError)
                if unforeseen and len(batch) > 1:
                    outcomes = await self._run_singly(batch)
                else:
                    outcomes = [(False, exc)] * len(batch)
        except Exception as exc:  # noqa: BLE001 - a bug in the batch code: every caller gets the error
            outcomes = [(False, exc)] * len(batch)
        except BaseException:  # cancelled (the loop is closing): the callers must not wait forever
            self._answer(batch, [(False, Unavailable("the ledger was closed while the operation ran"))] * len(batch))
            raise
        self._answer(batch, outcomes)

    async def _init_settle_connection(self, conn: Conn) -> None:
        """Give a new settle connection the lone path's functions. Failing to is not fatal (no TEMP
        privilege, say): the lone path is switched off and every operation takes the batch path."""
        if not self._lone_path:
            return
        try:
            await _prepare_settle_connection(conn)
        except asyncpg.PostgresError as exc:
            self._switch_off_lone_path(exc)

    def _switch_off_lone_path(self, exc: BaseException) -> None:
        if self._lone_path:
            self._lone_path = False
            log.warning(
                "lone_statement_path_off",
                reason=f"{type(exc).__name__}: {exc}",
                effect="every hold, capture and void takes the batch path (correct, a few round trips slower)",
            )

    async def _run_lone(self, op: _Op, conn: Conn) -> list[tuple[bool, Any]] | None:
        """A batch of one hold, capture or void as ONE auto-commit statement (``_LONE_FUNCTIONS``);
        None when the batch path must answer it (nothing was written: the operation was not the
        plain case, or the statement failed and rolled back)."""
        now = self._clock()
        try:
            if isinstance(op, _HoldOp):
                req = op.req
                row = await conn.fetchrow(
                    _LONE_HOLD, *(getattr(req, name) for name in _HOLD_FIELDS), now, float(req.lease_s)
                )
                if row is None or row[0] is None:
                    return None
                spend_remaining = None if row[2] is None else int(row[2])
                return [(True, HoldOutcome(HoldStatus(row[0]), available=int(row[1]), spend_remaining=spend_remaining))]
            if isinstance(op, _CaptureOp):
                row = await conn.fetchrow(
                    _LONE_CAPTURE, op.call_id, op.amount, now, self._system[AccountKind.PLATFORM_FEE]
                )
                if row is None or row[0] is None:
                    return None
                charge = Charge.captured(
                    op.call_id,
                    user=row[1],
                    developer=row[2],
                    server=row[3],
                    method=row[4],
                    name=row[5],
                    amount=int(row[6]),
                    fee=int(row[7]),
                    now=now,
                    balance_after=int(row[8]),
                )
                return [(True, charge)]
            if isinstance(op, _VoidOp):
                return [(True, bool(await conn.fetchval(_LONE_VOID, op.call_id, now)))]
            return None
        except _TIMED_OUT as exc:
            raise Unavailable(
                f"the ledger database is too busy ({exc.sqlstate}: {exc}); nothing was written", hint="Retry shortly"
            ) from exc
        except _CONNECTION_ERRORS as exc:  # the outcome of the statement is unknown: never re-run it
            raise Unavailable(
                f"lost the connection to the ledger database ({type(exc).__name__}: {exc})",
                hint="Retry shortly with the same idempotency key; check that PostgreSQL is up",
            ) from exc
        except _NO_LONE_PATH as exc:  # nothing ran: no need to try it (and log an error) every time
            self._switch_off_lone_path(exc)
            return None
        except asyncpg.PostgresError:  # rolled back with its statement: the batch path runs it again
            return None

    async def _run_singly(self, batch: Sequence[_Op]) -> list[tuple[bool, Any]]:
        """Each operation of a batch as a transaction of its own (``_single_*``)."""
        outcomes: list[tuple[bool, Any]] = []
        for op in batch:
            if op.future.done():  # its caller is gone; the batch wrote nothing for it
                outcomes.append((True, None))
                continue
            try:
                if isinstance(op, _HoldOp):
                    outcomes.append((True, await self._single_hold(op.req)))
                elif isinstance(op, _CaptureOp):
                    outcomes.append((True, await self._single_capture(op.call_id, op.amount)))
                elif isinstance(op, _VoidOp):
                    outcomes.append((True, await self._single_void(op.call_id)))
                else:
                    await self._single_renew(op.call_ids, op.lease_s)
                    outcomes.append((True, None))
            except Exception as exc:  # noqa: BLE001 - this operation's caller gets it; the others go on
                outcomes.append((False, exc))
        return outcomes

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
        # the guard of _post: no leg may take an account's available balance below zero
        if user.available + hold.amount - amount < 0 or any(
            accounts[account].available + value < 0 for account, value in legs[1:]
        ):
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

    # --- helpers (run inside a transaction) -----------------------------------------------------
    @staticmethod
    async def _account_id(conn: Conn, kind: AccountKind, name: str) -> int:
        account_id = await conn.fetchval("SELECT id FROM accounts WHERE kind = $1 AND name = $2", kind.value, name)
        if account_id is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return int(account_id)

    @staticmethod
    async def _lock_accounts(conn: Conn, ids: Sequence[int]) -> dict[int, Row]:
        """Lock these account rows in ascending id order (the one global lock order)."""
        rows = await conn.fetch(
            "SELECT id, kind, name, balance, held FROM accounts WHERE id = ANY($1::bigint[]) "
            "ORDER BY id FOR NO KEY UPDATE",
            sorted(set(ids)),
        )
        return {row["id"]: row for row in rows}

    @staticmethod
    async def _available(conn: Conn, account_id: int) -> int:
        return int(await conn.fetchval("SELECT balance - held FROM accounts WHERE id = $1", account_id))

    @staticmethod
    async def _spend_remaining(conn: Conn, key_id: str | None) -> int | None:
        if key_id is None:
            return None
        value = await conn.fetchval("SELECT spend_limit - spent - held FROM keys WHERE id = $1", key_id)
        return None if value is None else int(value)

    @staticmethod
    async def _post(conn: Conn, transfer_id: str, legs: Sequence[tuple[int, int]]) -> None:
        """Write balanced postings and apply them to balances (accounts already locked by the
        caller when there are several). A leg that would take a non-world account's available
        balance below zero raises ``_WouldGoNegative``; one that would take any balance outside
        +-MAX_BALANCE raises BalanceLimitExceeded (the transaction then rolls back)."""
        legs = [(account, amount) for account, amount in legs if amount != 0]
        if sum(amount for _, amount in legs) != 0:
            raise AssertionError(f"unbalanced transfer {transfer_id}: {legs}")
        if not legs:
            return
        await conn.execute(
            "INSERT INTO postings (transfer_id, account_id, amount) "
            "SELECT $1, a, m FROM unnest($2::bigint[], $3::bigint[]) AS l (a, m)",
            transfer_id,
            [account for account, _ in legs],
            [amount for _, amount in legs],
        )
        by_account: dict[int, int] = defaultdict(int)
        for account, amount in legs:
            by_account[account] += amount
        for account in sorted(by_account):
            amount = by_account[account]
            # Checked arithmetic: a leg is at most MAX_AMOUNT and a balance within +-MAX_BALANCE, so the sum
            # cannot leave BIGINT; a sum out of range updates nothing and is refused below.
            updated = await conn.fetchval(
                "UPDATE accounts SET balance = balance + $1 "
                "WHERE id = $2 AND (kind = 'world' OR balance - held + $1 >= 0) "
                "AND balance + $1 BETWEEN $3 AND $4 RETURNING id",
                amount,
                account,
                -MAX_BALANCE,
                MAX_BALANCE,
            )
            if updated is None:
                row = await conn.fetchrow("SELECT kind, name, balance FROM accounts WHERE id = $1", account)
                if row is not None and not within_balance_limit(int(row[2]) + amount):
                    raise balance_limit_error(row[0], row[1], int(row[2]), amount)
                raise _WouldGoNegative(account)

    @staticmethod
    async def _insert_transfer(
        conn: Conn,
        transfer_id: str,
        kind: str,
        amount: int,
        reference: str | None,
        account_id: int | None,
        charge_id: str | None,
        now: float,
    ) -> None:
        """Insert a transfer; a concurrent one with the same (kind, reference) raises ``_RaceLost``."""
        inserted = await conn.fetchval(
            "INSERT INTO transfers (id, kind, amount, reference, account_id, charge_id, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (kind, reference) WHERE reference IS NOT NULL DO NOTHING RETURNING id",
            transfer_id,
            kind,
            amount,
            reference,
            account_id,
            charge_id,
            now,
        )
        if inserted is None:
            raise _RaceLost

    @staticmethod
    async def _charge_by_id(conn: Conn, charge_id: str) -> Charge:
        row = await conn.fetchrow(f"SELECT {_CHARGE_COLUMNS} WHERE c.id = $1", charge_id)
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        return _charge(row)

    @staticmethod
    async def _key_by_id(conn: Conn, key_id: str) -> KeyRecord:
        row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} WHERE k.id = $1", key_id)
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _key_record(row)

    @staticmethod
    async def _account_row(conn: Conn, kind: AccountKind, name: str) -> Account:
        row = await conn.fetchrow(
            "SELECT id, kind, name, balance, held FROM accounts WHERE kind = $1 AND name = $2", kind.value, name
        )
        if row is None:
            raise NotFound(f"no {kind.value} named {name!r}")
        return Account(id=row[0], kind=AccountKind(row[1]), name=row[2], balance=row[3], held=row[4])

    @staticmethod
    async def _payout_by_id(conn: Conn, payout_id: str, *, lock: bool = False) -> tuple[Payout, int]:
        row = await conn.fetchrow(
            f"SELECT {_PAYOUT_COLUMNS} WHERE p.id = $1" + (" FOR NO KEY UPDATE OF p" if lock else ""),
            payout_id,
        )
        if row is None:
            raise NotFound(f"no payout {payout_id!r}")
        return _payout(row), int(row[7])

    # --- accounts -------------------------------------------------------------------------------
    async def create_user(self, name: str) -> Account:
        return await self._create_account(AccountKind.USER, name)

    async def create_developer(self, name: str) -> Account:
        return await self._create_account(AccountKind.DEVELOPER, name)

    async def _create_account(self, kind: AccountKind, name: str) -> Account:
        _require_name(name, f"{kind.value} name")

        async def tx(conn: Conn) -> Account:
            row = await conn.fetchrow(
                "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (kind, name) DO NOTHING RETURNING id, kind, name, balance, held",
                kind.value,
                name,
                self._clock(),
            )
            if row is None:
                raise AlreadyExists(f"{kind.value} {name!r} already exists")
            return Account(id=row[0], kind=AccountKind(row[1]), name=row[2], balance=row[3], held=row[4])

        return await self._run(tx, idempotent=False)

    async def get_account(self, kind: AccountKind, name: str) -> Account:
        return await self._read(lambda conn: self._account_row(conn, kind, name))

    async def developer_names(self) -> set[str]:
        async def tx(conn: Conn) -> set[str]:
            return {row[0] for row in await conn.fetch("SELECT name FROM accounts WHERE kind = 'developer'")}

        return await self._read(tx)

    async def topup(self, user: str, amount: int, reference: str | None = None) -> Transfer:
        _require_amount(amount)

        async def tx(conn: Conn) -> Transfer:
            user_id = await self._account_id(conn, AccountKind.USER, user)
            if reference is not None:
                row = await conn.fetchrow(
                    "SELECT id, amount, account_id, created_at FROM transfers WHERE kind = 'topup' AND reference = $1",
                    reference,
                )
                if row is not None:
                    if row[1] != amount or row[2] != user_id:
                        raise IdempotencyConflict(
                            f"top-up reference {reference!r} was already used for a different user or amount"
                        )
                    return Transfer(row[0], "topup", row[1], reference, row[3], replayed=True)
            world = self._system[AccountKind.WORLD]
            await self._lock_accounts(conn, [world, user_id])
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            await self._insert_transfer(conn, transfer_id, "topup", amount, reference, user_id, None, now)
            await self._post(conn, transfer_id, [(world, -amount), (user_id, amount)])
            return Transfer(transfer_id, "topup", amount, reference, now)

        return await self._run(tx, idempotent=reference is not None)

    # --- keys -----------------------------------------------------------------------------------
    async def create_key(
        self,
        *,
        user: str,
        server: str,
        key_hash: str,
        prefix: str,
        expires_at: float | None,
        spend_limit: int | None,
    ) -> KeyRecord:
        _require_name(server, "server")
        _require_name(key_hash, "key hash")
        if spend_limit is not None and (
            not isinstance(spend_limit, int) or isinstance(spend_limit, bool) or spend_limit < 0
        ):
            raise InvalidInput(f"spend limit must be a non-negative number of millicents, got {spend_limit!r}")

        async def tx(conn: Conn) -> KeyRecord:
            user_id = await self._account_id(conn, AccountKind.USER, user)
            key_id = "key_" + secrets.token_hex(6)
            inserted = await conn.fetchval(
                "INSERT INTO keys (id, user_account_id, server, key_hash, prefix, created_at, expires_at, spend_limit) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (key_hash) DO NOTHING RETURNING id",
                key_id,
                user_id,
                server,
                key_hash,
                prefix,
                self._clock(),
                expires_at,
                spend_limit,
            )
            if inserted is None:
                raise AlreadyExists("a key with this secret already exists")
            return await self._key_by_id(conn, key_id)

        return await self._run(tx, idempotent=False)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        async def tx(conn: Conn) -> KeyRecord | None:
            row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} WHERE k.key_hash = $1", key_hash)
            return None if row is None else _key_record(row)

        return await self._read(tx)

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]:
        async def tx(conn: Conn) -> list[KeyRecord]:
            if user is None:
                rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} ORDER BY k.created_at, k.id")
            else:
                user_id = await self._account_id(conn, AccountKind.USER, user)
                rows = await conn.fetch(
                    f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = $1 ORDER BY k.created_at, k.id", user_id
                )
            return [_key_record(row) for row in rows]

        return await self._read(tx)

    @staticmethod
    async def _match_one(conn: Conn, table: str, id_or_prefix: str, what: str) -> str:
        """The id of the one row of ``table`` whose id is ``id_or_prefix`` or whose id or prefix
        starts with it."""
        exact = await conn.fetchval(f"SELECT id FROM {table} WHERE id = $1", id_or_prefix)
        if exact is not None:
            return str(exact)
        n = len(id_or_prefix)
        matches = [
            row[0]
            for row in await conn.fetch(
                f"SELECT id FROM {table} WHERE left(prefix, $1) = $2 OR left(id, $1) = $2 ORDER BY id",
                n,
                id_or_prefix,
            )
        ]
        if not matches:
            raise NotFound(f"no {what} with id or prefix {id_or_prefix!r}")
        if len(matches) > 1:
            raise InvalidInput(
                f"{id_or_prefix!r} matches {len(matches)} {what}s ({', '.join(matches[:5])}"
                f"{', …' if len(matches) > 5 else ''})",
                hint=f"Give the {what} id or more characters of the prefix",
            )
        return str(matches[0])

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the key id or the start of its prefix")

        async def tx(conn: Conn) -> KeyRecord:
            key_id = await self._match_one(conn, "keys", id_or_prefix, "key")
            await conn.execute(
                "UPDATE keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2", self._clock(), key_id
            )
            return await self._key_by_id(conn, key_id)

        return await self._run(tx, idempotent=True)

    async def revoked_since(self, since: float) -> list[str]:
        async def tx(conn: Conn) -> list[str]:
            rows = await conn.fetch("SELECT id FROM keys WHERE revoked_at >= $1 ORDER BY revoked_at, id", float(since))
            return [row[0] for row in rows]

        return await self._read(tx)

    # --- two-phase money movement ---------------------------------------------------------------
    @staticmethod
    def _check_hold_request(req: HoldRequest) -> None:
        _require_amount(req.amount)
        if not isinstance(req.fee, int) or isinstance(req.fee, bool) or not 0 <= req.fee <= req.amount:
            raise InvalidInput(f"fee must be between 0 and the amount ({req.amount}), got {req.fee!r}")
        if not req.call_id:
            raise InvalidInput("a hold needs a call id")
        if not req.lease_s > 0:
            raise InvalidInput(f"lease must be positive, got {req.lease_s!r}")

    async def _parties(self, conn: Conn, req: HoldRequest) -> tuple[int, int]:
        """The user and developer account ids of a hold request (and check its key)."""
        row = await conn.fetchrow(
            "SELECT (SELECT id FROM accounts WHERE kind = 'user' AND name = $1), "
            "(SELECT id FROM accounts WHERE kind = 'developer' AND name = $2), "
            "(SELECT user_account_id FROM keys WHERE id = $3::text)",
            req.user,
            req.developer,
            req.key_id,
        )
        return self._check_parties(req, row)

    @staticmethod
    def _check_parties(req: HoldRequest, row: Sequence[Any]) -> tuple[int, int]:
        """(user id, developer id) from a row of (user id, developer id, key owner) looked up for ``req``."""
        user_id, developer_id, key_owner = row[0], row[1], row[2]
        if user_id is None:
            raise NotFound(f"no user named {req.user!r}")
        if developer_id is None:
            raise NotFound(f"no developer named {req.developer!r}")
        if req.key_id is not None:
            if key_owner is None:
                raise NotFound(f"no key {req.key_id!r}")
            if key_owner != user_id:
                raise InvalidInput(f"key {req.key_id} does not belong to user {req.user!r}")
        return int(user_id), int(developer_id)

    async def _insert_hold(self, conn: Conn, req: HoldRequest, user_id: int, developer_id: int, now: float) -> bool:
        """Insert the hold row; False when a hold with this call id already exists."""
        inserted = await conn.fetchval(
            f"INSERT INTO holds ({HOLD_INSERT_COLUMNS}) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) "
            "ON CONFLICT (call_id) DO NOTHING RETURNING call_id",
            *hold_row(req, user_id, developer_id, now),
        )
        return inserted is not None

    @staticmethod
    async def _existing_hold(conn: Conn, req: HoldRequest, user_id: int, developer_id: int) -> Row:
        """The stored hold with ``req.call_id``, after checking that ``req`` is the same call."""
        row = await conn.fetchrow(
            "SELECT user_account_id, developer_account_id, server, name, amount, state, charge_id "
            "FROM holds WHERE call_id = $1",
            req.call_id,
        )
        assert row is not None  # the insert conflicted with it and holds are never deleted
        if (row[0], row[1], row[2], row[3], row[4]) != (user_id, developer_id, req.server, req.name, req.amount):
            raise IdempotencyConflict(
                f"call id {req.call_id!r} was already used for a different user, developer, server, name or amount"
            )
        return row

    async def _reserve(self, conn: Conn, req: HoldRequest, user_id: int) -> HoldOutcome:
        """The guarded reservation: raises ``_Rollback`` with the refusal when it does not fit."""
        available = await conn.fetchval(
            "UPDATE accounts SET held = held + $1 WHERE id = $2 AND balance - held >= $1 RETURNING balance - held",
            req.amount,
            user_id,
        )
        if available is None:
            raise _Rollback(
                HoldOutcome(
                    HoldStatus.INSUFFICIENT_FUNDS,
                    available=await self._available(conn, user_id),
                    spend_remaining=await self._spend_remaining(conn, req.key_id),
                )
            )
        spend_remaining: int | None = None
        if req.key_id is not None:
            row = await conn.fetchrow(
                "UPDATE keys SET held = held + $1 WHERE id = $2 "
                "AND (spend_limit IS NULL OR spent + held + $1 <= spend_limit) "
                "RETURNING spend_limit - spent - held",
                req.amount,
                req.key_id,
            )
            if row is None:
                raise _Rollback(
                    HoldOutcome(
                        HoldStatus.SPEND_LIMIT,
                        available=int(available) + req.amount,
                        spend_remaining=await self._spend_remaining(conn, req.key_id),
                    )
                )
            spend_remaining = None if row[0] is None else int(row[0])
        return HoldOutcome(HoldStatus.OK, available=int(available), spend_remaining=spend_remaining)

    async def hold(self, req: HoldRequest) -> HoldOutcome:
        self._check_hold_request(req)
        outcome: HoldOutcome = await self._submit(_HoldOp(req, self._future()))
        return outcome

    async def _single_hold(self, req: HoldRequest) -> HoldOutcome:
        """``hold`` as a transaction of its own (when a batch has to be split up)."""

        async def tx(conn: Conn) -> HoldOutcome:
            user_id, developer_id = await self._parties(conn, req)
            if not await self._insert_hold(conn, req, user_id, developer_id, self._clock()):
                await self._existing_hold(conn, req, user_id, developer_id)
                return HoldOutcome(
                    HoldStatus.REPLAYED,
                    available=await self._available(conn, user_id),
                    spend_remaining=await self._spend_remaining(conn, req.key_id),
                )
            return await self._reserve(conn, req, user_id)

        return await self._run(tx, idempotent=True)

    async def capture(self, call_id: str, amount: int | None = None) -> Charge:
        if amount is not None:
            _require_amount(amount, "capture amount")
        charge: Charge = await self._submit(_CaptureOp(call_id, amount, self._future()))
        return charge

    async def _single_capture(self, call_id: str, amount: int | None) -> Charge:
        async def tx(conn: Conn) -> Charge:
            return await self._tx_capture(conn, call_id, amount)

        return await self._run(tx, idempotent=True, settle=True)

    async def _tx_capture(self, conn: Conn, call_id: str, amount: int | None) -> Charge:
        row = await conn.fetchrow(
            "SELECT h.key_id, h.user_account_id, h.developer_account_id, h.amount, h.fee, h.state, h.charge_id, "
            "u.name, d.name, h.server, h.method, h.name "
            "FROM holds h JOIN accounts u ON u.id = h.user_account_id JOIN accounts d ON d.id = h.developer_account_id "
            "WHERE h.call_id = $1 FOR NO KEY UPDATE OF h",
            call_id,
        )
        if row is None:
            raise NotFound(f"no hold for call {call_id!r}")
        key_id, user_id, developer_id, held, hold_fee, state, charge_id = row[:7]
        if state == HoldState.CAPTURED:
            return replace(await self._charge_by_id(conn, charge_id), replayed=True)
        if state == HoldState.VOIDED:
            raise Conflict(f"the hold for call {call_id!r} was voided; it cannot be captured")
        if amount is None:
            amount = int(held)
        if amount > held:
            raise InvalidInput(
                f"cannot capture {format_cents(amount)} cents: the hold for call {call_id!r} "
                f"reserved only {format_cents(held)}"
            )
        fee = hold_fee * amount // held
        platform = self._system[AccountKind.PLATFORM_FEE]
        await self._lock_accounts(conn, [user_id, developer_id, platform])
        now = self._clock()
        charge_id = charge_id_for(call_id)  # unique: the hold row is locked and pending
        await self._insert_transfer(conn, charge_id, "charge", amount, call_id, user_id, None, now)
        await conn.execute(
            "UPDATE holds SET state = 'captured', charge_id = $1, settled_at = $2 "
            "WHERE call_id = $3 AND state = 'pending'",
            charge_id,
            now,
            call_id,
        )
        await conn.execute("UPDATE accounts SET held = held - $1 WHERE id = $2", held, user_id)
        if key_id is not None:
            await conn.execute(
                "UPDATE keys SET held = held - $1, spent = spent + $2 WHERE id = $3", held, amount, key_id
            )
        await self._post(conn, charge_id, [(user_id, -amount), (developer_id, amount - fee), (platform, fee)])
        balance_after = await self._available(conn, user_id)
        await conn.execute(
            "INSERT INTO charges (id, call_id, user_account_id, developer_account_id, amount, fee, "
            "balance_after, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            charge_id,
            call_id,
            user_id,
            developer_id,
            amount,
            fee,
            balance_after,
            now,
        )
        return Charge.captured(
            call_id,
            user=row[7],
            developer=row[8],
            server=row[9],
            method=row[10],
            name=row[11],
            amount=amount,
            fee=fee,
            now=now,
            balance_after=balance_after,
        )

    async def charge(self, req: HoldRequest) -> ChargeResult:
        self._check_hold_request(req)

        async def tx(conn: Conn) -> ChargeResult:
            user_id, developer_id = await self._parties(conn, req)
            if not await self._insert_hold(conn, req, user_id, developer_id, self._clock()):
                existing = await self._existing_hold(conn, req, user_id, developer_id)
                if existing["state"] == HoldState.VOIDED:
                    raise Conflict(f"call {req.call_id!r} was released without a charge; use a new idempotency key")
                if existing["state"] == HoldState.PENDING:
                    raise Conflict(
                        f"call {req.call_id!r} is a pending hold; capture or release it instead of charging again"
                    )
                return ChargeResult(
                    HoldStatus.REPLAYED,
                    available=await self._available(conn, user_id),
                    charge=await self._charge_by_id(conn, existing["charge_id"]),
                    spend_remaining=await self._spend_remaining(conn, req.key_id),
                )
            # The capture below locks the developer and platform accounts too: take every account
            # lock now, in id order, before the reservation locks the key row.
            await self._lock_accounts(conn, [user_id, developer_id, self._system[AccountKind.PLATFORM_FEE]])
            try:
                await self._reserve(conn, req, user_id)
            except _Rollback as refused:
                outcome = refused.result
                assert isinstance(outcome, HoldOutcome)
                refusal = ChargeResult(outcome.status, outcome.available, None, outcome.spend_remaining)
                raise _Rollback(refusal) from None
            charge = await self._tx_capture(conn, req.call_id, None)
            return ChargeResult(
                HoldStatus.OK,
                available=charge.balance_after,
                charge=charge,
                spend_remaining=await self._spend_remaining(conn, req.key_id),
            )

        return await self._run(tx, idempotent=True)

    async def void(self, call_id: str) -> bool:
        """Release a pending hold. False when it was not pending, or no such hold exists."""
        released: bool = await self._submit(_VoidOp(call_id, self._future()))
        return released

    async def _single_void(self, call_id: str) -> bool:
        async def tx(conn: Conn) -> bool:
            rows = await conn.fetch(
                "UPDATE holds SET state = 'voided', settled_at = $1 WHERE call_id = $2 AND state = 'pending' "
                "RETURNING user_account_id, key_id, amount",
                self._clock(),
                call_id,
            )
            await self._release(conn, rows)
            return bool(rows)

        return await self._run(tx, idempotent=True, settle=True)

    async def _release(self, conn: Conn, voided: Sequence[Row]) -> None:
        """Give back what voided holds (rows of user_account_id, key_id, amount) reserved,
        locking accounts and then keys in id order."""
        by_account: dict[int, int] = defaultdict(int)
        by_key: dict[str, int] = defaultdict(int)
        for user_id, key_id, amount in voided:
            by_account[user_id] += amount
            if key_id is not None:
                by_key[key_id] += amount
        for account in sorted(by_account):
            await conn.execute("UPDATE accounts SET held = held - $1 WHERE id = $2", by_account[account], account)
        for key in sorted(by_key):
            await conn.execute("UPDATE keys SET held = held - $1 WHERE id = $2", by_key[key], key)

    async def renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        if not call_ids:
            return
        await self._submit(_RenewOp(tuple(call_ids), lease_s, self._future()))

    async def _single_renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        async def tx(conn: Conn) -> None:
            await conn.execute(
                "WITH claimed AS (SELECT call_id FROM holds WHERE call_id = ANY($2::text[]) AND state = 'pending' "
                "ORDER BY call_id FOR NO KEY UPDATE) "
                "UPDATE holds h SET lease_expires_at = $1 FROM claimed "
                "WHERE h.call_id = claimed.call_id AND h.state = 'pending'",
                self._clock() + lease_s,
                list(call_ids),
            )

        await self._run(tx, idempotent=True)

    async def sweep(self, now: float | None = None) -> int:
        at = self._clock() if now is None else now
        batch = self.SWEEP_BATCH

        async def tx(conn: Conn) -> int:
            # SKIP LOCKED: a hold another sweeper (or a capture) has locked is theirs to settle.
            rows = await conn.fetch(
                "WITH lapsed AS (SELECT call_id FROM holds WHERE state = 'pending' AND lease_expires_at < $1 "
                "ORDER BY call_id LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED) "
                "UPDATE holds h SET state = 'voided', settled_at = $1 FROM lapsed "
                "WHERE h.call_id = lapsed.call_id AND h.state = 'pending' "
                "RETURNING h.user_account_id, h.key_id, h.amount",
                float(at),
                batch,
            )
            await self._release(conn, rows)
            return len(rows)

        total = 0
        while True:
            swept = await self._run(tx, idempotent=True)
            total += swept
            if swept < batch:
                return total

    async def get_hold(self, call_id: str) -> HoldInfo:
        async def tx(conn: Conn) -> HoldInfo:
            row = await conn.fetchrow(f"SELECT {_HOLD_COLUMNS} WHERE h.call_id = $1", call_id)
            if row is None:
                raise NotFound(f"no hold for call {call_id!r}")
            return _hold_info(row)

        return await self._read(tx)

    # --- refunds --------------------------------------------------------------------------------
    async def refund(self, charge_id: str, amount: int | None = None, reference: str | None = None) -> Transfer:
        """Reverse all or part of a charge: developer -share, platform_fee -fee share, user +amount.

        ``amount`` defaults to what remains refundable. Cumulative refunds never exceed the charge
        (Conflict). A repeated non-None ``reference`` returns the original refund with
        ``replayed=True``; the same reference for another charge or amount raises
        IdempotencyConflict. Raises Conflict when the developer's unpaid earnings cannot cover it.
        """
        if amount is not None:
            _require_amount(amount, "refund amount")

        async def tx(conn: Conn) -> Transfer:
            return await self._tx_refund(conn, charge_id, amount, reference)

        return await self._run(tx, idempotent=reference is not None)

    async def _tx_refund(self, conn: Conn, charge_id: str, amount: int | None, reference: str | None) -> Transfer:
        row = await conn.fetchrow(
            "SELECT c.amount, c.fee, c.refunded, c.user_account_id, c.developer_account_id, h.key_id "
            "FROM charges c JOIN holds h ON h.call_id = c.call_id WHERE c.id = $1 FOR NO KEY UPDATE OF c",
            charge_id,
        )
        if row is None:
            raise NotFound(f"no charge {charge_id!r}")
        charged, fee, refunded, user_id, developer_id, key_id = row
        if reference is not None:
            prior = await conn.fetchrow(
                "SELECT id, amount, charge_id, created_at FROM transfers WHERE kind = 'refund' AND reference = $1",
                reference,
            )
            if prior is not None:
                if prior[2] != charge_id or (amount is not None and amount != prior[1]):
                    raise IdempotencyConflict(
                        f"refund reference {reference!r} was already used for a different charge or amount"
                    )
                return Transfer(prior[0], "refund", prior[1], reference, prior[3], replayed=True)
        if amount is None:
            amount = charged - refunded
            if amount == 0:
                raise Conflict(f"charge {charge_id} is already fully refunded")
        after = await conn.fetchval(
            "UPDATE charges SET refunded = refunded + $1 WHERE id = $2 AND refunded + $1 <= amount RETURNING refunded",
            amount,
            charge_id,
        )
        if after is None:
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: only "
                f"{format_cents(charged - refunded)} of its {format_cents(charged)} cents remain refundable"
            )
        before = after - amount
        # Fee shares computed cumulatively, so partial refunds add up to exactly the fee.
        fee_share = fee * after // charged - fee * before // charged
        platform = self._system[AccountKind.PLATFORM_FEE]
        await self._lock_accounts(conn, [user_id, developer_id, platform])
        now = self._clock()
        transfer_id = "tr_" + uuid.uuid4().hex
        await self._insert_transfer(conn, transfer_id, "refund", amount, reference, user_id, charge_id, now)
        try:
            await self._post(
                conn,
                transfer_id,
                [(developer_id, -(amount - fee_share)), (platform, -fee_share), (user_id, amount)],
            )
        except _WouldGoNegative as exc:
            account = await conn.fetchrow("SELECT kind, name, balance FROM accounts WHERE id = $1", exc.account_id)
            raise Conflict(
                f"cannot refund {format_cents(amount)} cents of charge {charge_id}: the {account[0]} account "
                f"{account[1]!r} holds only {format_cents(account[2])} cents (earnings already paid out)",
                hint="Refund a smaller amount or settle it outside AgentPay",
            ) from None
        if key_id is not None:
            await conn.execute("UPDATE keys SET spent = spent - $1 WHERE id = $2", amount, key_id)
        return Transfer(transfer_id, "refund", amount, reference, now)

    async def get_charge(self, charge_id: str) -> Charge:
        return await self._read(lambda conn: self._charge_by_id(conn, charge_id))

    async def list_charges(
        self,
        *,
        developer: str | None = None,
        user: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Charge]:
        """Newest first, ordered by (created_at, id) so the ``before`` cursor is stable. Raises
        NotFound for an unknown developer or user, InvalidInput for a cursor outside the list."""
        _require_limit(limit)

        async def tx(conn: Conn) -> list[Charge]:
            developer_id = None if developer is None else await self._account_id(conn, AccountKind.DEVELOPER, developer)
            user_id = None if user is None else await self._account_id(conn, AccountKind.USER, user)
            where = (
                "($1::bigint IS NULL OR c.developer_account_id = $1) AND ($2::bigint IS NULL OR c.user_account_id = $2)"
            )
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = await conn.fetchrow(
                    f"SELECT c.created_at, c.id FROM charges c WHERE {where} AND c.id = $3",
                    developer_id,
                    user_id,
                    before,
                )
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the id of the last charge of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = await conn.fetch(
                f"SELECT {_CHARGE_COLUMNS} WHERE {where} "
                "AND ($3::float8 IS NULL OR (c.created_at, c.id) < ($3, $4::text)) "
                "ORDER BY c.created_at DESC, c.id DESC LIMIT $5",
                developer_id,
                user_id,
                cursor[0],
                cursor[1],
                limit,
            )
            return [_charge(row) for row in rows]

        return await self._read(tx)

    # --- service tokens -------------------------------------------------------------------------
    async def create_service_token(
        self, *, developer: str, servers: Sequence[str], token_hash: str, prefix: str
    ) -> ServiceToken:
        _require_name(token_hash, "token hash")
        _require_name(prefix, "token prefix")
        if isinstance(servers, str):
            raise InvalidInput("servers must be a list of server names, not one string")
        names = list(dict.fromkeys(_require_name(server, "server") for server in servers))
        if not names:
            raise InvalidInput("a service token needs at least one server")

        async def tx(conn: Conn) -> ServiceToken:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            token_id = "tok_" + secrets.token_hex(6)
            inserted = await conn.fetchval(
                "INSERT INTO service_tokens (id, developer_account_id, servers, token_hash, prefix, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (token_hash) DO NOTHING RETURNING id",
                token_id,
                developer_id,
                names,
                token_hash,
                prefix,
                self._clock(),
            )
            if inserted is None:
                raise AlreadyExists("a service token with this secret already exists")
            return _token(await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} WHERE t.id = $1", token_id))

        return await self._run(tx, idempotent=False)

    async def find_service_token(self, token_hash: str) -> ServiceToken | None:
        async def tx(conn: Conn) -> ServiceToken | None:
            row = await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} WHERE t.token_hash = $1", token_hash)
            return None if row is None else _token(row)

        return await self._read(tx)

    async def list_service_tokens(self, developer: str | None = None) -> list[ServiceToken]:
        async def tx(conn: Conn) -> list[ServiceToken]:
            developer_id = None if developer is None else await self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = await conn.fetch(
                f"SELECT {_TOKEN_COLUMNS} WHERE ($1::bigint IS NULL OR t.developer_account_id = $1) "
                "ORDER BY t.created_at, t.id",
                developer_id,
            )
            return [_token(row) for row in rows]

        return await self._read(tx)

    async def revoke_service_token(self, id_or_prefix: str) -> ServiceToken:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the service token id or the start of its prefix")

        async def tx(conn: Conn) -> ServiceToken:
            token_id = await self._match_one(conn, "service_tokens", id_or_prefix, "service token")
            await conn.execute(
                "UPDATE service_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
                self._clock(),
                token_id,
            )
            return _token(await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} WHERE t.id = $1", token_id))

        return await self._run(tx, idempotent=True)

    # --- payouts --------------------------------------------------------------------------------
    async def create_payout(self, developer: str, amount: int | None = None) -> Payout:
        if amount is not None:
            _require_amount(amount, "payout amount")

        async def tx(conn: Conn) -> Payout:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            clearing = self._system[AccountKind.PAYOUT_CLEARING]
            locked = await self._lock_accounts(conn, [developer_id, clearing])
            available = int(locked[developer_id]["balance"] - locked[developer_id]["held"])
            value = available if amount is None else amount
            if value <= 0:
                raise InvalidInput(f"developer {developer!r} has no earnings to pay out")
            payout_id = "po_" + uuid.uuid4().hex
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            await self._insert_transfer(conn, transfer_id, "payout", value, payout_id, developer_id, None, now)
            try:  # the guarded UPDATE in _post refuses to take the developer below zero
                await self._post(conn, transfer_id, [(developer_id, -value), (clearing, value)])
            except _WouldGoNegative:
                raise Conflict(
                    f"cannot pay out {format_cents(value)} cents: developer {developer!r} has only "
                    f"{format_cents(available)} cents of earnings",
                    hint="Pay out at most the available earnings, or give no amount to pay out all of them",
                ) from None
            await conn.execute(
                "INSERT INTO payouts (id, developer_account_id, amount, transfer_id, created_at) "
                "VALUES ($1, $2, $3, $4, $5)",
                payout_id,
                developer_id,
                value,
                transfer_id,
                now,
            )
            return Payout(payout_id, developer, value, PayoutState.PENDING, None, now, None)

        # Not idempotent (no caller key): never re-run; with the fixed lock order it never deadlocks.
        return await self._run(tx, idempotent=False)

    async def settle_payout(self, payout_id: str, reference: str) -> Payout:
        _require_name(reference, "payout reference")

        async def tx(conn: Conn) -> Payout:
            payout, developer_id = await self._pending_payout(conn, payout_id, PayoutState.SETTLED, reference)
            if payout.state is PayoutState.SETTLED:
                return payout  # settled again with the same reference
            clearing, world = self._system[AccountKind.PAYOUT_CLEARING], self._system[AccountKind.WORLD]
            return await self._complete_payout(
                conn,
                payout,
                PayoutState.SETTLED,
                reference,
                developer_id,
                [(clearing, -payout.amount), (world, payout.amount)],
            )

        return await self._run(tx, idempotent=True)

    async def fail_payout(self, payout_id: str) -> Payout:
        async def tx(conn: Conn) -> Payout:
            payout, developer_id = await self._pending_payout(conn, payout_id, PayoutState.FAILED, None)
            clearing = self._system[AccountKind.PAYOUT_CLEARING]
            return await self._complete_payout(
                conn,
                payout,
                PayoutState.FAILED,
                None,
                developer_id,
                [(clearing, -payout.amount), (developer_id, payout.amount)],
            )

        return await self._run(tx, idempotent=True)

    async def _pending_payout(
        self, conn: Conn, payout_id: str, target: PayoutState, reference: str | None
    ) -> tuple[Payout, int]:
        """The payout, locked, and its developer account id. It is pending, or (a replay) already
        settled with the same reference when ``target`` is settled. Raises NotFound, or Conflict
        when the payout already reached another final state."""
        payout, developer_id = await self._payout_by_id(conn, payout_id, lock=True)
        if payout.state is PayoutState.PENDING:
            return payout, developer_id
        if payout.state is PayoutState.SETTLED is target and payout.reference == reference:
            return payout, developer_id
        settled = f" with reference {payout.reference!r}" if payout.state is PayoutState.SETTLED else ""
        raise Conflict(
            f"payout {payout_id} is already {payout.state}{settled}; it cannot be {target.value}",
            hint="A payout leaves 'pending' once: settle it or fail it, not both",
        )

    async def _complete_payout(
        self,
        conn: Conn,
        payout: Payout,
        state: PayoutState,
        reference: str | None,
        developer_id: int,
        legs: Sequence[tuple[int, int]],
    ) -> Payout:
        """pending -> ``state`` (the payout row is locked by the caller) and its transfer."""
        await self._lock_accounts(conn, [account for account, _ in legs])
        now = self._clock()
        updated = await conn.fetchval(
            "UPDATE payouts SET state = $1, reference = $2, completed_at = $3 "
            "WHERE id = $4 AND state = 'pending' RETURNING id",
            state.value,
            reference,
            now,
            payout.id,
        )
        if updated is None:
            raise Conflict(f"payout {payout.id} is no longer pending")
        transfer_id = "tr_" + uuid.uuid4().hex
        kind = "payout_settle" if state is PayoutState.SETTLED else "payout_fail"
        await self._insert_transfer(conn, transfer_id, kind, payout.amount, payout.id, developer_id, None, now)
        await self._post(conn, transfer_id, legs)
        return Payout(payout.id, payout.developer, payout.amount, state, reference, payout.created_at, now)

    async def list_payouts(self, developer: str | None = None) -> list[Payout]:
        """Newest first."""

        async def tx(conn: Conn) -> list[Payout]:
            developer_id = None if developer is None else await self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = await conn.fetch(
                f"SELECT {_PAYOUT_COLUMNS} WHERE ($1::bigint IS NULL OR p.developer_account_id = $1) "
                "ORDER BY p.created_at DESC, p.id DESC",
                developer_id,
            )
            return [_payout(row) for row in rows]

        return await self._read(tx)

    async def statement(self, developer: str, *, limit: int = 100, before: str | None = None) -> list[StatementLine]:
        """Every posting on the developer's account (charges, refunds, payouts, failed payouts),
        newest first by (created_at, transfer id); ``before`` is the last transfer id of the
        previous page."""
        _require_limit(limit)

        async def tx(conn: Conn) -> list[StatementLine]:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            cursor: tuple[float | None, str | None] = (None, None)
            if before is not None:
                row = await conn.fetchrow(
                    "SELECT t.created_at, t.id FROM transfers t WHERE t.id = $1 AND EXISTS "
                    "(SELECT 1 FROM postings p WHERE p.transfer_id = t.id AND p.account_id = $2)",
                    before,
                    developer_id,
                )
                if row is None:
                    raise InvalidInput(
                        f"unknown cursor {before!r}", hint="Pass the last transfer id of the previous page"
                    )
                cursor = (row[0], row[1])
            rows = await conn.fetch(
                "SELECT t.id, t.kind, SUM(p.amount)::bigint, h.server, h.name, t.charge_id, t.created_at "
                "FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "LEFT JOIN charges c ON c.id = CASE WHEN t.kind = 'charge' THEN t.id ELSE t.charge_id END "
                "LEFT JOIN holds h ON h.call_id = c.call_id "
                "WHERE p.account_id = $1 AND ($2::float8 IS NULL OR (t.created_at, t.id) < ($2, $3::text)) "
                "GROUP BY t.id, h.server, h.name ORDER BY t.created_at DESC, t.id DESC LIMIT $4",
                developer_id,
                cursor[0],
                cursor[1],
                limit,
            )
            return [StatementLine(*row) for row in rows]

        return await self._read(tx)

    async def earnings_breakdown(self, developer: str) -> list[EarningsBreakdown]:
        async def tx(conn: Conn) -> list[EarningsBreakdown]:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            # Credited = amount - fee; refunds take back (refunded - fee share), fee shares being
            # cumulative (fee * refunded // amount), exactly as refund() posts them.
            rows = await conn.fetch(
                "SELECT h.server, h.name, COUNT(*), "
                "SUM((c.amount - c.fee) - (c.refunded - c.fee * c.refunded / c.amount))::bigint "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id WHERE c.developer_account_id = $1 "
                "GROUP BY h.server, h.name ORDER BY h.server, h.name",
                developer_id,
            )
            return [EarningsBreakdown(developer, row[0], row[1], int(row[2]), int(row[3])) for row in rows]

        return await self._read(tx)

    # --- reporting ------------------------------------------------------------------------------
    async def user_summary(self, user: str, recent: int = 10) -> UserSummary:
        async def tx(conn: Conn) -> UserSummary:
            account = await self._account_row(conn, AccountKind.USER, user)
            keys = await conn.fetch(
                f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = $1 ORDER BY k.created_at, k.id", account.id
            )
            charges = await conn.fetch(
                f"SELECT {_CHARGE_COLUMNS} WHERE c.user_account_id = $1 "
                "ORDER BY c.created_at DESC, c.seq DESC LIMIT $2",
                account.id,
                max(recent, 0),
            )
            return UserSummary(
                user=user,
                balance=account.balance,
                held=account.held,
                available=account.available,
                keys=[_key_record(row) for row in keys],
                recent_charges=[_charge(row) for row in charges],
            )

        return await self._read(tx)

    async def usage(self, user: str | None = None, server: str | None = None) -> list[UsageRow]:
        async def tx(conn: Conn) -> list[UsageRow]:
            rows = await conn.fetch(
                "SELECT u.name, h.server, h.method, h.name, COUNT(*), SUM(c.amount)::bigint "
                "FROM charges c JOIN holds h ON h.call_id = c.call_id "
                "JOIN accounts u ON u.id = c.user_account_id "
                "WHERE ($1::text IS NULL OR u.name = $1) AND ($2::text IS NULL OR h.server = $2) "
                "GROUP BY u.name, h.server, h.method, h.name ORDER BY u.name, h.server, h.method, h.name",
                user,
                server,
            )
            return [UsageRow(row[0], row[1], row[2], row[3], int(row[4]), int(row[5])) for row in rows]

        return await self._read(tx)

    async def earnings(self, developer: str) -> Earnings:
        async def tx(conn: Conn) -> Earnings:
            account = await self._account_row(conn, AccountKind.DEVELOPER, developer)
            lifetime = await conn.fetchval(
                "SELECT COALESCE(SUM(p.amount), 0)::bigint FROM postings p JOIN transfers t ON t.id = p.transfer_id "
                "WHERE p.account_id = $1 AND t.kind IN ('charge', 'refund')",
                account.id,
            )
            return Earnings(developer=developer, earnings=account.balance, lifetime=int(lifetime))

        return await self._read(tx)

    async def verify(self) -> list[str]:
        return await self._read(_verify)

    # --- maintenance: migrations, export / import -----------------------------------------------
    async def _applied_before_open(self) -> set[str]:
        """Migrations recorded in the schema before this ledger opened it (none if it has no tables)."""
        try:
            conn = await asyncpg.connect(self.dsn, timeout=ACQUIRE_TIMEOUT_S)
        except _CONNECTION_ERRORS as exc:
            raise Unavailable(
                f"cannot connect to the ledger database: {exc}",
                hint="Check that PostgreSQL is running and the database URL is right",
            ) from exc
        except asyncpg.PostgresError as exc:
            raise Unavailable(f"cannot open the ledger database: {exc}", hint="Check the database URL") from exc
        try:
            schema = self.schema if self.schema is not None else await conn.fetchval("SELECT current_schema()")
            if schema is None:
                return set()
            table = await conn.fetchval("SELECT to_regclass(format('%I.schema_migrations', $1::text))", schema)
            if table is None:
                return set()
            rows = await conn.fetch(f"SELECT name FROM {_quote_ident(schema)}.schema_migrations")
            return {row[0] for row in rows}
        finally:
            await conn.close()

    async def migrate(self) -> list[str]:
        if self._pool is not None:
            before = set(await self.applied_migrations())
        else:
            before = await self._applied_before_open()
            await self.open()
        after = set(await self.applied_migrations())
        return [name for name, _ in MIGRATIONS if name in after and name not in before]

    async def applied_migrations(self) -> list[str]:
        async def tx(conn: Conn) -> list[str]:
            return [row[0] for row in await conn.fetch("SELECT name FROM schema_migrations ORDER BY name")]

        return await self._read(tx)

    async def export_rows(self) -> list[ExportRow]:
        async def tx(conn: Conn) -> list[ExportRow]:
            rows: list[ExportRow] = []
            for table in EXPORT_TABLES:
                names = [name for name, _ in EXPORT_COLUMNS[table]]
                for record in await conn.fetch(_EXPORT_QUERIES[table]):
                    row = dict(zip(names, record, strict=True))
                    if table == "service_tokens":
                        row["servers"] = list(row["servers"])
                    rows.append((table, row))
            return rows

        return await self._read(tx)

    async def import_rows(self, rows: Iterable[ExportRow]) -> dict[str, int]:
        by_table: dict[str, list[dict[str, Any]]] = {table: [] for table in EXPORT_TABLES}
        for table, row in rows:
            by_table[table].append(check_row(table, row))

        async def tx(conn: Conn) -> tuple[dict[str, int], dict[AccountKind, int]]:
            # No other transaction may write while the target is checked empty and filled.
            await conn.execute(
                "LOCK TABLE accounts, transfers, postings, keys, holds, charges, service_tokens, payouts "
                "IN EXCLUSIVE MODE"
            )
            in_use = await conn.fetchrow(
                "SELECT (SELECT COUNT(*) FROM accounts WHERE kind IN ('user', 'developer')), "
                "(SELECT COUNT(*) FROM transfers), (SELECT COUNT(*) FROM keys), (SELECT COUNT(*) FROM holds), "
                "(SELECT COUNT(*) FROM service_tokens), (SELECT COUNT(*) FROM payouts)"
            )
            if any(in_use):
                where = f"schema {self.schema}" if self.schema is not None else "database"
                raise Conflict(
                    f"the target ledger ({where}) is not empty ({in_use[0]} users/developers, "
                    f"{in_use[1]} transfers); import only into a new, empty ledger",
                    hint="Point --into at a new database or schema (postgresql://…/db?schema=NAME)",
                )
            await conn.execute("DELETE FROM accounts")  # only the system accounts: the dump brings its own
            counts: dict[str, int] = {}
            for table in EXPORT_TABLES:
                batch = by_table[table]
                counts[table] = len(batch)
                if not batch:
                    continue
                names = [name for name, _ in EXPORT_COLUMNS[table]]
                # charges.seq numbers charges again in dump (= insertion) order; ids are kept
                overriding = " OVERRIDING SYSTEM VALUE" if table in ("accounts", "postings") else ""
                sql = (
                    f"INSERT INTO {table} ({', '.join(names)}){overriding} "
                    f"VALUES ({', '.join(f'${i}' for i in range(1, len(names) + 1))})"
                )
                try:
                    await conn.executemany(sql, [[row[name] for name in names] for row in batch])
                except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
                    raise InvalidInput(f"the {table} rows of the dump do not fit: {exc}") from None
            for table, column in (("accounts", "id"), ("postings", "id"), ("charges", "seq")):
                await conn.execute(
                    "SELECT setval(pg_get_serial_sequence($1, $2), "
                    f"COALESCE((SELECT max({column}) FROM {table}), 0) + 1, false)",
                    table if self.schema is None else f"{_quote_ident(self.schema)}.{table}",
                    column,
                )
            now = self._clock()
            system: dict[AccountKind, int] = {}
            for kind in _SYSTEM_KINDS:  # a dump without them still gets them
                await conn.execute(
                    "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) "
                    "ON CONFLICT (kind, name) DO NOTHING",
                    kind.value,
                    SYSTEM_NAME,
                    now,
                )
                system[kind] = await conn.fetchval(
                    "SELECT id FROM accounts WHERE kind = $1 AND name = $2", kind.value, SYSTEM_NAME
                )
            return counts, system

        # Not idempotent as a whole (a re-run would find the target full): never re-run.
        counts, self._system = await self._run(tx, idempotent=False)
        return counts


async def _verify(conn: Conn) -> list[str]:
    """Every invariant, checked inside the caller's single REPEATABLE READ transaction."""
    problems: list[str] = []

    async def q(sql: str) -> list[Row]:
        return list(await conn.fetch(sql))

    total = (await q("SELECT COALESCE(SUM(amount), 0)::bigint FROM postings"))[0][0]
    if total != 0:
        problems.append(f"postings sum to {total}, not 0")
    for transfer_id, s in await q(
        "SELECT transfer_id, SUM(amount)::bigint FROM postings GROUP BY transfer_id HAVING SUM(amount) <> 0"
    ):
        problems.append(f"transfer {transfer_id}: postings sum to {s}, not 0")
    for transfer_id, kind, amount, credits in await q(
        "SELECT t.id, t.kind, t.amount, COALESCE(SUM(p.amount) FILTER (WHERE p.amount > 0), 0)::bigint "
        "FROM transfers t LEFT JOIN postings p ON p.transfer_id = t.id GROUP BY t.id "
        "HAVING COALESCE(SUM(p.amount) FILTER (WHERE p.amount > 0), 0) <> t.amount"
    ):
        problems.append(f"{kind} transfer {transfer_id}: amount {amount} but its credits sum to {credits}")
    for kind, name, balance, s in await q(
        "SELECT a.kind, a.name, a.balance, COALESCE(p.s, 0)::bigint FROM accounts a "
        "LEFT JOIN (SELECT account_id, SUM(amount) AS s FROM postings GROUP BY account_id) p "
        "ON p.account_id = a.id WHERE a.balance <> COALESCE(p.s, 0) ORDER BY a.id"
    ):
        problems.append(f"{kind} {name!r}: balance {balance} but its postings sum to {s}")
    for kind, name, held, s in await q(
        "SELECT a.kind, a.name, a.held, COALESCE(h.s, 0)::bigint FROM accounts a "
        "LEFT JOIN (SELECT user_account_id, SUM(amount) AS s FROM holds WHERE state = 'pending' "
        "GROUP BY user_account_id) h ON h.user_account_id = a.id WHERE a.held <> COALESCE(h.s, 0) ORDER BY a.id"
    ):
        problems.append(f"{kind} {name!r}: held {held} but its pending holds sum to {s}")
    for key_id, held, s in await q(
        "SELECT k.id, k.held, COALESCE(h.s, 0)::bigint FROM keys k "
        "LEFT JOIN (SELECT key_id, SUM(amount) AS s FROM holds WHERE state = 'pending' GROUP BY key_id) h "
        "ON h.key_id = k.id WHERE k.held <> COALESCE(h.s, 0) ORDER BY k.id"
    ):
        problems.append(f"key {key_id}: held {held} but its pending holds sum to {s}")
    for key_id, spent, s in await q(
        "SELECT k.id, k.spent, COALESCE(c.s, 0)::bigint FROM keys k "
        "LEFT JOIN (SELECT h.key_id, SUM(c.amount - c.refunded) AS s FROM charges c "
        "JOIN holds h ON h.call_id = c.call_id GROUP BY h.key_id) c "
        "ON c.key_id = k.id WHERE k.spent <> COALESCE(c.s, 0) ORDER BY k.id"
    ):
        problems.append(f"key {key_id}: spent {spent} but its charges net of refunds sum to {s}")
    for name, balance, held in await q(
        "SELECT name, balance, held FROM accounts WHERE kind = 'user' AND (balance - held < 0 OR held < 0) ORDER BY id"
    ):
        problems.append(f"user {name!r}: balance {balance} with {held} held leaves a negative available")
    for kind, name, held in await q("SELECT kind, name, held FROM accounts WHERE held < 0 AND kind <> 'user'"):
        problems.append(f"{kind} {name!r}: negative held {held}")
    for kind, name, balance in await q(
        "SELECT kind, name, balance FROM accounts "
        f"WHERE balance > {MAX_BALANCE} OR balance < {-MAX_BALANCE} ORDER BY id"
    ):
        problems.append(f"{kind} {name!r}: balance {balance} is outside +-{MAX_BALANCE}")
    for kind, name, balance in await q(
        "SELECT kind, name, balance FROM accounts "
        "WHERE kind IN ('developer', 'platform_fee', 'payout_clearing') AND balance < 0 ORDER BY id"
    ):
        problems.append(f"{kind} {name!r}: negative balance {balance}")
    for call_id, charge_id, hold_amount, charge_amount, transfer_kind, user_posting in await q(
        "SELECT h.call_id, h.charge_id, h.amount, c.amount, t.kind, "
        "(SELECT SUM(p.amount)::bigint FROM postings p "
        " WHERE p.transfer_id = h.charge_id AND p.account_id = h.user_account_id) "
        "FROM holds h LEFT JOIN charges c ON c.id = h.charge_id LEFT JOIN transfers t ON t.id = h.charge_id "
        "WHERE h.state = 'captured' ORDER BY h.call_id"
    ):
        if charge_id is None or charge_amount is None or transfer_kind != "charge":
            problems.append(f"captured hold {call_id}: no charge transfer")
        elif user_posting != -charge_amount:
            problems.append(
                f"captured hold {call_id}: charge {charge_id} debits the user {user_posting}, not {-charge_amount}"
            )
        elif charge_amount > hold_amount:
            problems.append(f"captured hold {call_id}: charged {charge_amount}, more than held {hold_amount}")
    for charge_id, refunded, s in await q(
        "SELECT c.id, c.refunded, COALESCE(r.s, 0)::bigint FROM charges c "
        "LEFT JOIN (SELECT charge_id, SUM(amount) AS s FROM transfers WHERE kind = 'refund' "
        "GROUP BY charge_id) r ON r.charge_id = c.id WHERE c.refunded <> COALESCE(r.s, 0) ORDER BY c.id"
    ):
        problems.append(f"charge {charge_id}: refunded {refunded} but its refunds sum to {s}")
    problems += await _verify_payouts(conn)
    return problems


_PAYOUT_LEGS = {"payout": (1, -1), "payout_settle": (-1, 0), "payout_fail": (-1, 1)}  # (clearing, developer)
_PAYOUT_TRANSFERS = {
    "pending": {"payout"},
    "settled": {"payout", "payout_settle"},
    "failed": {"payout", "payout_fail"},
}


async def _verify_payouts(conn: Conn) -> list[str]:
    """payout_clearing holds exactly what pending payouts owe, and each payout has exactly the
    transfers its state implies, each moving its amount between the right accounts."""
    problems: list[str] = []
    for balance, pending in await conn.fetch(
        "SELECT a.balance, (SELECT COALESCE(SUM(amount), 0)::bigint FROM payouts WHERE state = 'pending') "
        "FROM accounts a WHERE a.kind = 'payout_clearing'"
    ):
        if balance != pending:
            problems.append(f"payout_clearing: balance {balance} but pending payouts sum to {pending}")
    payouts = {
        row[0]: (row[1], row[2]) for row in await conn.fetch("SELECT id, state, amount FROM payouts ORDER BY id")
    }
    found: dict[str, set[str]] = defaultdict(set)
    for transfer_id, kind, reference, amount, clearing, developer in await conn.fetch(
        "SELECT t.id, t.kind, t.reference, t.amount, "
        "COALESCE((SELECT SUM(p.amount) FROM postings p JOIN accounts a ON a.id = p.account_id "
        "          WHERE p.transfer_id = t.id AND a.kind = 'payout_clearing'), 0)::bigint, "
        "COALESCE((SELECT SUM(p.amount) FROM postings p JOIN payouts po ON po.id = t.reference "
        "          WHERE p.transfer_id = t.id AND p.account_id = po.developer_account_id), 0)::bigint "
        "FROM transfers t WHERE t.kind IN ('payout', 'payout_settle', 'payout_fail') ORDER BY t.id"
    ):
        if reference not in payouts:
            problems.append(f"{kind} transfer {transfer_id}: belongs to no payout")
            continue
        _, payout_amount = payouts[reference]
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
    for payout_id, (state, _) in payouts.items():
        expected = _PAYOUT_TRANSFERS[state]
        if found[payout_id] != expected:
            missing = ", ".join(sorted(expected - found[payout_id])) or "none"
            extra = ", ".join(sorted(found[payout_id] - expected)) or "none"
            problems.append(f"{state} payout {payout_id}: missing transfers {missing}; unexpected {extra}")
    return problems
