"""The payment provider's tables (``payments_0001_...`` migrations of the ``payments`` side store): one
schema written for SQLite, its PostgreSQL form derived from it (identities, BIGINT, DOUBLE PRECISION).
What each table records is said in ``gateway.payments.store``."""

from __future__ import annotations

from gateway.storage import Migration

_SQLITE = """
CREATE TABLE stripe_customers (
    user_name      TEXT PRIMARY KEY,
    customer_id    TEXT NOT NULL UNIQUE,
    payment_method TEXT,
    created_at     REAL NOT NULL
);
CREATE TABLE stripe_topups (
    id             TEXT PRIMARY KEY,
    user_name      TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('checkout', 'recharge')),
    amount_cents   INTEGER NOT NULL CHECK (amount_cents > 0),
    currency       TEXT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('created', 'pending', 'credited', 'failed', 'refunded')),
    session_id     TEXT UNIQUE,
    payment_intent TEXT UNIQUE,
    url            TEXT,
    refunded_cents INTEGER NOT NULL DEFAULT 0,
    detail         TEXT,
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);
CREATE INDEX stripe_topups_user ON stripe_topups (user_name, created_at);
CREATE TABLE stripe_recharge (
    user_name         TEXT PRIMARY KEY,
    enabled           INTEGER NOT NULL,
    threshold_cents   INTEGER NOT NULL CHECK (threshold_cents >= 0),
    amount_cents      INTEGER NOT NULL CHECK (amount_cents > 0),
    monthly_cap_cents INTEGER NOT NULL CHECK (monthly_cap_cents >= 0),
    paused_reason     TEXT,
    failures          INTEGER NOT NULL DEFAULT 0,
    inflight          TEXT,
    updated_at        REAL NOT NULL
);
CREATE TABLE stripe_alerts (
    user_name       TEXT PRIMARY KEY,
    threshold_cents INTEGER NOT NULL CHECK (threshold_cents >= 0),
    armed           INTEGER NOT NULL DEFAULT 1,
    updated_at      REAL NOT NULL
);
CREATE TABLE stripe_notices (
    id         INTEGER PRIMARY KEY,
    user_name  TEXT NOT NULL,
    kind       TEXT NOT NULL,
    message    TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX stripe_notices_user ON stripe_notices (user_name, id);
CREATE TABLE stripe_accounts (
    developer       TEXT PRIMARY KEY,
    account_id      TEXT NOT NULL UNIQUE,
    payouts_enabled INTEGER NOT NULL DEFAULT 0,
    updated_at      REAL NOT NULL
);
CREATE TABLE stripe_payouts (
    payout_id    TEXT PRIMARY KEY,
    developer    TEXT NOT NULL,
    account_id   TEXT NOT NULL,
    amount_cents INTEGER NOT NULL CHECK (amount_cents > 0),
    transfer_id  TEXT UNIQUE,
    state        TEXT NOT NULL CHECK (state IN ('created', 'paid', 'failed', 'reversed')),
    detail       TEXT,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE TABLE stripe_events (
    handler     TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    type        TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (handler, event_id)
);
"""

_POSTGRES = (
    _SQLITE.replace("INTEGER PRIMARY KEY", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    .replace(" INTEGER ", " BIGINT ")
    .replace(" REAL ", " DOUBLE PRECISION ")
)

SQLITE_MIGRATIONS: tuple[Migration, ...] = (("payments_0001_initial", _SQLITE),)
POSTGRES_MIGRATIONS: tuple[Migration, ...] = (("payments_0001_initial", _POSTGRES),)
