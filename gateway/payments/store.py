"""The payment provider's records, in their own tables beside the ledger (never in it): Stripe
customers per user, top-ups and their states, auto-recharge settings and balance alerts, notices
shown in the portal, connected accounts per developer, transfers of payouts, and a log of the
webhook events each handler saw.

These rows say what happened at Stripe; money moves only through the ledger, whose references
("stripe:checkout:<session>", …) deduplicate every credit and clawback in the same transaction as
the transfer. A record here is updated after the ledger write; if that update fails, Stripe's retry
(or ``payments reconcile``) re-runs the handler and the ledger reference makes the money move once.

One side store (``gateway.storage``: concern ``payments``, migrations ``payments_0001_...``). Every
method is one statement in one transaction; the SQL is shared by both stores (``?`` placeholders,
numbered for PostgreSQL), the schema is per store (``gateway.payments.schema``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from gateway.payments.schema import POSTGRES_MIGRATIONS, SQLITE_MIGRATIONS
from gateway.storage import PostgresSide, SqliteSide, open_side

TopupState = Literal["created", "pending", "credited", "failed", "refunded"]
TOPUP_STATES: tuple[TopupState, ...] = ("created", "pending", "credited", "failed", "refunded")


@dataclass(frozen=True, slots=True)
class Topup:
    id: str
    user: str
    kind: str  # checkout | recharge
    amount_cents: int
    currency: str
    state: TopupState
    session_id: str | None
    payment_intent: str | None
    url: str | None
    refunded_cents: int
    detail: str | None
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "topup_id": self.id,
            "kind": self.kind,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "state": self.state,
            "session_id": self.session_id,
            "payment_intent": self.payment_intent,
            "refunded_cents": self.refunded_cents,
            "detail": self.detail,
            "created_at": self.created_at,
        }


@dataclass(frozen=True, slots=True)
class Recharge:
    user: str
    enabled: bool
    threshold_cents: int
    amount_cents: int
    monthly_cap_cents: int
    paused_reason: str | None
    failures: int
    inflight: str | None
    updated_at: float  # when the settings changed or the attempt in flight was claimed


@dataclass(frozen=True, slots=True)
class Notice:
    id: int
    user: str
    kind: str
    message: str
    created_at: float


@dataclass(frozen=True, slots=True)
class ConnectedAccount:
    developer: str
    account_id: str
    payouts_enabled: bool


@dataclass(frozen=True, slots=True)
class PayoutTransfer:
    payout_id: str
    developer: str
    account_id: str
    amount_cents: int
    transfer_id: str | None
    state: str  # created | paid | failed | reversed
    detail: str | None


_TOPUP_COLUMNS = (
    "id, user_name, kind, amount_cents, currency, state, session_id, payment_intent, url, refunded_cents, detail, "
    "created_at, updated_at"
)
_RECHARGE_COLUMNS = (
    "user_name, enabled, threshold_cents, amount_cents, monthly_cap_cents, paused_reason, failures, inflight, "
    "updated_at"
)


def _numbered(sql: str) -> str:
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


class PaymentsStore:
    """The records, one statement per call (see the module docstring)."""

    def __init__(self, side: SqliteSide | PostgresSide, *, clock: Callable[[], float] = time.time) -> None:
        self._side = side
        self._clock = clock

    @classmethod
    def for_database(cls, database_url: str, *, clock: Callable[[], float] = time.time) -> PaymentsStore:
        side = open_side(
            database_url,
            concern="payments",
            sqlite_migrations=SQLITE_MIGRATIONS,
            postgres_migrations=POSTGRES_MIGRATIONS,
            clock=clock,
        )
        return cls(side, clock=clock)

    async def open(self) -> None:
        await self._side.open()

    async def close(self) -> None:
        await self._side.close()

    # --- the three primitives -------------------------------------------------------------------
    async def _execute(self, sql: str, *params: Any) -> int:
        """Run one statement in its own transaction; the number of rows it changed."""
        side = self._side
        if isinstance(side, SqliteSide):
            return await side.write(lambda conn: conn.execute(sql, params).rowcount)

        async def tx(conn: Any) -> int:
            status = await conn.execute(_numbered(sql), *params)
            tail = str(status).rsplit(" ", 1)[-1]
            return int(tail) if tail.isdigit() else 0

        return await side.transaction(tx)

    async def _fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        side = self._side
        if isinstance(side, SqliteSide):
            return await side.read(lambda conn: [tuple(row) for row in conn.execute(sql, params).fetchall()])

        async def tx(conn: Any) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await conn.fetch(_numbered(sql), *params)]

        return await side.transaction(tx)

    async def _write_fetch(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """A write with RETURNING: the rows it returned."""
        side = self._side
        if isinstance(side, SqliteSide):
            return await side.write(lambda conn: [tuple(row) for row in conn.execute(sql, params).fetchall()])

        async def tx(conn: Any) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await conn.fetch(_numbered(sql), *params)]

        return await side.transaction(tx)

    # --- customers ------------------------------------------------------------------------------
    async def customer(self, user: str) -> tuple[str, str | None] | None:
        """(customer id, saved payment method) of a user, or None."""
        rows = await self._fetch("SELECT customer_id, payment_method FROM stripe_customers WHERE user_name = ?", user)
        return (rows[0][0], rows[0][1]) if rows else None

    async def remember_customer(self, user: str, customer_id: str) -> str:
        """Record the user's customer (the first one wins); the customer id in force."""
        await self._execute(
            "INSERT INTO stripe_customers (user_name, customer_id, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT (user_name) DO NOTHING",
            user,
            customer_id,
            self._clock(),
        )
        found = await self.customer(user)
        assert found is not None
        return found[0]

    async def save_payment_method(self, user: str, payment_method: str) -> None:
        await self._execute("UPDATE stripe_customers SET payment_method = ? WHERE user_name = ?", payment_method, user)

    # --- top-ups --------------------------------------------------------------------------------
    async def create_topup(self, topup_id: str, user: str, kind: str, amount_cents: int, currency: str) -> None:
        now = self._clock()
        await self._execute(
            "INSERT INTO stripe_topups (id, user_name, kind, amount_cents, currency, state, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, ?, 'created', ?, ?)",
            topup_id,
            user,
            kind,
            amount_cents,
            currency,
            now,
            now,
        )

    async def topup(self, topup_id: str) -> Topup | None:
        rows = await self._fetch(f"SELECT {_TOPUP_COLUMNS} FROM stripe_topups WHERE id = ?", topup_id)
        return _topup(rows[0]) if rows else None

    async def topup_by(self, *, session_id: str | None = None, payment_intent: str | None = None) -> Topup | None:
        if session_id is not None:
            rows = await self._fetch(f"SELECT {_TOPUP_COLUMNS} FROM stripe_topups WHERE session_id = ?", session_id)
        else:
            rows = await self._fetch(
                f"SELECT {_TOPUP_COLUMNS} FROM stripe_topups WHERE payment_intent = ?", payment_intent
            )
        return _topup(rows[0]) if rows else None

    async def topups(self, user: str, limit: int = 20) -> list[Topup]:
        rows = await self._fetch(
            f"SELECT {_TOPUP_COLUMNS} FROM stripe_topups WHERE user_name = ? ORDER BY created_at DESC, id DESC LIMIT ?",
            user,
            limit,
        )
        return [_topup(row) for row in rows]

    async def all_topups(self, since: float) -> list[Topup]:
        rows = await self._fetch(
            f"SELECT {_TOPUP_COLUMNS} FROM stripe_topups WHERE created_at >= ? ORDER BY created_at, id", since
        )
        return [_topup(row) for row in rows]

    async def session_created(self, topup_id: str, session_id: str, url: str) -> None:
        """created → pending: the Checkout Session exists (its URL shown to the user)."""
        await self._execute(
            "UPDATE stripe_topups SET session_id = ?, url = ?, updated_at = ?, "
            "state = CASE WHEN state = 'created' THEN 'pending' ELSE state END WHERE id = ?",
            session_id,
            url,
            self._clock(),
            topup_id,
        )

    async def link_payment_intent(self, topup_id: str, payment_intent: str) -> None:
        await self._execute(
            "UPDATE stripe_topups SET payment_intent = ?, updated_at = ? WHERE id = ? AND payment_intent IS NULL",
            payment_intent,
            self._clock(),
            topup_id,
        )

    async def set_state(
        self, topup_id: str, state: TopupState, *, only_from: Sequence[TopupState], detail: str | None = None
    ) -> bool:
        """Move a top-up to ``state`` if it is in one of ``only_from`` (a conditional update: final
        states are never left by a late or repeated event)."""
        marks = ", ".join("?" * len(only_from))
        changed = await self._execute(
            f"UPDATE stripe_topups SET state = ?, detail = COALESCE(?, detail), updated_at = ? "
            f"WHERE id = ? AND state IN ({marks})",
            state,
            detail,
            self._clock(),
            topup_id,
            *only_from,
        )
        return changed == 1

    async def note_refunded(self, topup_id: str, refunded_cents: int) -> None:
        """Record Stripe's cumulative ``amount_refunded`` (never lowered) and, when all of it was
        refunded, the state ``refunded``."""
        await self._execute(
            "UPDATE stripe_topups SET refunded_cents = CASE WHEN refunded_cents > ? THEN refunded_cents ELSE ? END, "
            "state = CASE WHEN ? >= amount_cents AND state = 'credited' THEN 'refunded' ELSE state END, "
            "updated_at = ? WHERE id = ?",
            refunded_cents,
            refunded_cents,
            refunded_cents,
            self._clock(),
            topup_id,
        )

    async def recharged_this_month(self, user: str, month_start: float) -> int:
        """Cents of auto-recharges of this month that are on their way or credited."""
        rows = await self._fetch(
            "SELECT COALESCE(SUM(amount_cents), 0) FROM stripe_topups WHERE user_name = ? AND kind = 'recharge' "
            "AND created_at >= ? AND state IN ('created', 'pending', 'credited', 'refunded')",
            user,
            month_start,
        )
        return int(rows[0][0])

    # --- auto-recharge --------------------------------------------------------------------------
    async def recharge(self, user: str) -> Recharge | None:
        rows = await self._fetch(f"SELECT {_RECHARGE_COLUMNS} FROM stripe_recharge WHERE user_name = ?", user)
        return _recharge(rows[0]) if rows else None

    async def recharge_users(self) -> dict[str, int]:
        """Users whose auto-recharge is on (and not paused), with their thresholds in cents."""
        rows = await self._fetch(
            "SELECT user_name, threshold_cents FROM stripe_recharge WHERE enabled = 1 AND paused_reason IS NULL"
        )
        return {row[0]: int(row[1]) for row in rows}

    async def set_recharge(
        self, user: str, *, enabled: bool, threshold_cents: int, amount_cents: int, monthly_cap_cents: int
    ) -> None:
        """Save the settings; saving them (again) also lifts a pause and forgets past failures."""
        await self._execute(
            "INSERT INTO stripe_recharge (user_name, enabled, threshold_cents, amount_cents, monthly_cap_cents, "
            "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_name) DO UPDATE SET enabled = excluded.enabled, "
            "threshold_cents = excluded.threshold_cents, amount_cents = excluded.amount_cents, "
            "monthly_cap_cents = excluded.monthly_cap_cents, paused_reason = NULL, failures = 0, "
            "updated_at = excluded.updated_at",
            user,
            1 if enabled else 0,
            threshold_cents,
            amount_cents,
            monthly_cap_cents,
            self._clock(),
        )

    async def claim_recharge(self, user: str, topup_id: str) -> bool:
        """Mark an attempt in flight: True for exactly one caller while none is (in the database, so
        replicas agree), and only while auto-recharge is on and not paused."""
        changed = await self._execute(
            "UPDATE stripe_recharge SET inflight = ?, updated_at = ? "
            "WHERE user_name = ? AND enabled = 1 AND paused_reason IS NULL AND inflight IS NULL",
            topup_id,
            self._clock(),
            user,
        )
        return changed == 1

    async def finish_recharge(self, user: str, topup_id: str, *, failed: str | None, max_failures: int = 3) -> str:
        """The attempt ``topup_id`` ended: success clears the failure count; a failure pauses (and
        after ``max_failures`` in a row switches off). Returns "ok", "paused", "disabled" or "stale"
        (not the attempt in flight: a repeated event)."""
        if failed is None:
            changed = await self._execute(
                "UPDATE stripe_recharge SET inflight = NULL, failures = 0, updated_at = ? "
                "WHERE user_name = ? AND inflight = ?",
                self._clock(),
                user,
                topup_id,
            )
            return "ok" if changed == 1 else "stale"
        rows = await self._write_fetch(
            "UPDATE stripe_recharge SET inflight = NULL, failures = failures + 1, paused_reason = ?, "
            "enabled = CASE WHEN failures + 1 >= ? THEN 0 ELSE enabled END, updated_at = ? "
            "WHERE user_name = ? AND inflight = ? RETURNING enabled",
            failed,
            max_failures,
            self._clock(),
            user,
            topup_id,
        )
        if not rows:
            return "stale"
        return "paused" if int(rows[0][0]) == 1 else "disabled"

    # --- balance alerts -------------------------------------------------------------------------
    async def set_alert(self, user: str, threshold_cents: int | None) -> None:
        if threshold_cents is None:
            await self._execute("DELETE FROM stripe_alerts WHERE user_name = ?", user)
            return
        await self._execute(
            "INSERT INTO stripe_alerts (user_name, threshold_cents, armed, updated_at) VALUES (?, ?, 1, ?) "
            "ON CONFLICT (user_name) DO UPDATE SET threshold_cents = excluded.threshold_cents, armed = 1, "
            "updated_at = excluded.updated_at",
            user,
            threshold_cents,
            self._clock(),
        )

    async def alert(self, user: str) -> tuple[int, bool] | None:
        rows = await self._fetch("SELECT threshold_cents, armed FROM stripe_alerts WHERE user_name = ?", user)
        return (int(rows[0][0]), bool(rows[0][1])) if rows else None

    async def alert_users(self) -> dict[str, int]:
        rows = await self._fetch("SELECT user_name, threshold_cents FROM stripe_alerts")
        return {row[0]: int(row[1]) for row in rows}

    async def fire_alert(self, user: str) -> bool:
        """Disarm the alert: True for exactly one caller per crossing below the threshold."""
        return (
            await self._execute(
                "UPDATE stripe_alerts SET armed = 0, updated_at = ? WHERE user_name = ? AND armed = 1",
                self._clock(),
                user,
            )
            == 1
        )

    async def rearm_alert(self, user: str) -> None:
        await self._execute(
            "UPDATE stripe_alerts SET armed = 1, updated_at = ? WHERE user_name = ? AND armed = 0", self._clock(), user
        )

    # --- notices --------------------------------------------------------------------------------
    async def add_notice(self, user: str, kind: str, message: str) -> None:
        await self._execute(
            "INSERT INTO stripe_notices (user_name, kind, message, created_at) VALUES (?, ?, ?, ?)",
            user,
            kind,
            message,
            self._clock(),
        )

    async def notices(self, user: str, limit: int = 10) -> list[Notice]:
        rows = await self._fetch(
            "SELECT id, user_name, kind, message, created_at FROM stripe_notices WHERE user_name = ? "
            "ORDER BY id DESC LIMIT ?",
            user,
            limit,
        )
        return [Notice(int(r[0]), r[1], r[2], r[3], float(r[4])) for r in rows]

    # --- connected accounts and payout transfers ------------------------------------------------
    async def account(self, developer: str) -> ConnectedAccount | None:
        rows = await self._fetch(
            "SELECT developer, account_id, payouts_enabled FROM stripe_accounts WHERE developer = ?", developer
        )
        return ConnectedAccount(rows[0][0], rows[0][1], bool(rows[0][2])) if rows else None

    async def remember_account(self, developer: str, account_id: str) -> str:
        await self._execute(
            "INSERT INTO stripe_accounts (developer, account_id, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (developer) DO NOTHING",
            developer,
            account_id,
            self._clock(),
        )
        found = await self.account(developer)
        assert found is not None
        return found.account_id

    async def set_payouts_enabled(self, account_id: str, enabled: bool) -> bool:
        return (
            await self._execute(
                "UPDATE stripe_accounts SET payouts_enabled = ?, updated_at = ? WHERE account_id = ?",
                1 if enabled else 0,
                self._clock(),
                account_id,
            )
            == 1
        )

    async def create_payout_transfer(self, payout_id: str, developer: str, account_id: str, amount_cents: int) -> None:
        now = self._clock()
        await self._execute(
            "INSERT INTO stripe_payouts (payout_id, developer, account_id, amount_cents, state, created_at, "
            "updated_at) VALUES (?, ?, ?, ?, 'created', ?, ?) ON CONFLICT (payout_id) DO NOTHING",
            payout_id,
            developer,
            account_id,
            amount_cents,
            now,
            now,
        )

    async def payout_transfer(
        self, *, payout_id: str | None = None, transfer_id: str | None = None
    ) -> PayoutTransfer | None:
        columns = "payout_id, developer, account_id, amount_cents, transfer_id, state, detail"
        if payout_id is not None:
            rows = await self._fetch(f"SELECT {columns} FROM stripe_payouts WHERE payout_id = ?", payout_id)
        else:
            rows = await self._fetch(f"SELECT {columns} FROM stripe_payouts WHERE transfer_id = ?", transfer_id)
        if not rows:
            return None
        r = rows[0]
        return PayoutTransfer(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6])

    async def set_payout_transfer(
        self, payout_id: str, state: str, *, transfer_id: str | None = None, detail: str | None = None
    ) -> None:
        await self._execute(
            "UPDATE stripe_payouts SET state = ?, transfer_id = COALESCE(?, transfer_id), "
            "detail = COALESCE(?, detail), updated_at = ? WHERE payout_id = ?",
            state,
            transfer_id,
            detail,
            self._clock(),
            payout_id,
        )

    # --- the event log --------------------------------------------------------------------------
    async def log_event(self, handler: str, event_id: str, event_type: str, outcome: str) -> None:
        """Record what ``handler`` did with an event (a log for operators and ``reconcile``; the
        ledger's references, not this table, make a repeated event harmless)."""
        await self._execute(
            "INSERT INTO stripe_events (handler, event_id, type, outcome, received_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (handler, event_id) DO UPDATE SET outcome = excluded.outcome, "
            "received_at = excluded.received_at",
            handler,
            event_id,
            event_type,
            outcome,
            self._clock(),
        )

    async def seen_events(self, since: float) -> set[str]:
        rows = await self._fetch("SELECT DISTINCT event_id FROM stripe_events WHERE received_at >= ?", since)
        return {row[0] for row in rows}


def _topup(row: Sequence[Any]) -> Topup:
    return Topup(
        id=row[0],
        user=row[1],
        kind=row[2],
        amount_cents=int(row[3]),
        currency=row[4],
        state=row[5],
        session_id=row[6],
        payment_intent=row[7],
        url=row[8],
        refunded_cents=int(row[9]),
        detail=row[10],
        created_at=float(row[11]),
        updated_at=float(row[12]),
    )


def _recharge(row: Sequence[Any]) -> Recharge:
    return Recharge(
        user=row[0],
        enabled=bool(row[1]),
        threshold_cents=int(row[2]),
        amount_cents=int(row[3]),
        monthly_cap_cents=int(row[4]),
        paused_reason=row[5],
        failures=int(row[6]),
        inflight=row[7],
        updated_at=float(row[8]),
    )
