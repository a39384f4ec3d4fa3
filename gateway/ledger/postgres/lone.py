"""The lone path: a group-commit batch of ONE hold, capture or void (what a lone caller sends) runs as
one auto-commit statement, a call of a session-local function (``_LONE_FUNCTIONS``), instead of the
batch path's BEGIN, lock, write, COMMIT (``batch_tx``). ``_prepare_settle_connection`` creates the
functions on every new connection of the settle pool (``PostgresLone._init_settle_connection``);
where they are missing or cannot be made, the path switches itself off and the batch path answers
every operation.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import structlog

from gateway.errors import Unavailable
from gateway.ledger.base import AccountKind, Charge, HoldOutcome, HoldStatus
from gateway.ledger.postgres.common import (
    _CONNECTION_ERRORS,
    _HOLD_FIELDS,
    _TIMED_OUT,
    Conn,
    _CaptureOp,
    _HoldOp,
    _Op,
    _VoidOp,
)
from gateway.ledger.postgres.store import PostgresStore

log = structlog.get_logger("gateway.ledger.postgres")

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


async def _prepare_settle_connection(conn: Conn) -> None:
    """Create the session-local functions of the lone-operation path on a new settle connection."""
    await conn.execute(_LONE_FUNCTIONS)


_NO_LONE_PATH = (asyncpg.exceptions.UndefinedFunctionError, asyncpg.exceptions.InsufficientPrivilegeError)
"""What a lone statement gets where its functions are missing (a transaction-mode pooler put it on
another server connection) or could not be made (no TEMP privilege)."""


class PostgresLone(PostgresStore):
    """The lone path: settle connections get its functions, and a batch of one runs as one statement."""

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
