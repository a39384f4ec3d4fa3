"""The PostgreSQL ledger schema, as named migrations applied in order.

``PostgresLedger.open`` (``store.py``) applies them in one transaction that first takes a
transaction-level advisory lock (``pg_advisory_xact_lock``) keyed by the schema name, so several
gateway replicas starting at once apply each migration exactly once; the ``schema_migrations`` row
that records a migration commits with it. Never edit a migration that has shipped: append a new one.

Same tables and guards as the SQLite schema (``gateway.ledger.sqlite.migrations``), with PostgreSQL
types: amounts are ``BIGINT`` millicents, times are ``DOUBLE PRECISION`` unix seconds (exactly what
the injected clock returned), ``charges.seq`` stands in for SQLite's rowid (insertion order), and
service tokens keep their servers as ``TEXT[]``. Text columns use the "C" collation, so ids and
names sort bytewise as in SQLite whatever the database's default collation: lists page newest
first by (created_at, id) and both stores return the same pages.
``CHECK`` constraints make an overdraft impossible even for a buggy caller; the conditional
``UPDATE``s of this package turn "would overdraw" into zero rows.
"""

from __future__ import annotations

SCHEMA_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       TEXT COLLATE "C" PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)
"""

_INITIAL = """
CREATE TABLE accounts (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT COLLATE "C" NOT NULL
               CHECK (kind IN ('user', 'developer', 'world', 'platform_fee', 'payout_clearing')),
    name       TEXT COLLATE "C" NOT NULL,
    balance    BIGINT NOT NULL DEFAULT 0,
    held       BIGINT NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,
    UNIQUE (kind, name),
    CONSTRAINT accounts_held_not_negative CHECK (held >= 0),
    CONSTRAINT accounts_user_available_not_negative CHECK (kind <> 'user' OR balance - held >= 0),
    CONSTRAINT accounts_balance_not_negative CHECK (kind = 'world' OR balance >= 0)
);

CREATE TABLE transfers (
    id         TEXT COLLATE "C" PRIMARY KEY,
    kind       TEXT COLLATE "C" NOT NULL
               CHECK (kind IN ('topup', 'charge', 'refund', 'payout', 'payout_settle', 'payout_fail')),
    amount     BIGINT NOT NULL CHECK (amount > 0),
    reference  TEXT COLLATE "C",
    account_id BIGINT REFERENCES accounts (id),  -- the user (top-ups, charges, refunds)
    charge_id  TEXT COLLATE "C" REFERENCES transfers (id),   -- refunds: the charge they reverse
    created_at DOUBLE PRECISION NOT NULL
);
CREATE UNIQUE INDEX transfers_kind_reference ON transfers (kind, reference) WHERE reference IS NOT NULL;
CREATE INDEX transfers_charge ON transfers (charge_id) WHERE charge_id IS NOT NULL;
CREATE INDEX transfers_created ON transfers (created_at, id);

CREATE TABLE postings (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transfer_id TEXT COLLATE "C" NOT NULL REFERENCES transfers (id),
    account_id  BIGINT NOT NULL REFERENCES accounts (id),
    amount      BIGINT NOT NULL CHECK (amount <> 0)
);
CREATE INDEX postings_transfer ON postings (transfer_id);
CREATE INDEX postings_account ON postings (account_id);

CREATE FUNCTION postings_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'postings are immutable';
END;
$$;
CREATE TRIGGER postings_are_immutable BEFORE UPDATE OR DELETE ON postings
    FOR EACH ROW EXECUTE FUNCTION postings_are_immutable();

CREATE TABLE keys (
    id              TEXT COLLATE "C" PRIMARY KEY,
    user_account_id BIGINT NOT NULL REFERENCES accounts (id),
    server          TEXT COLLATE "C" NOT NULL,
    key_hash        TEXT COLLATE "C" NOT NULL UNIQUE,
    prefix          TEXT COLLATE "C" NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    expires_at      DOUBLE PRECISION,
    revoked_at      DOUBLE PRECISION,
    spend_limit     BIGINT CHECK (spend_limit IS NULL OR spend_limit >= 0),
    spent           BIGINT NOT NULL DEFAULT 0 CHECK (spent >= 0),
    held            BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    CONSTRAINT keys_within_spend_limit CHECK (spend_limit IS NULL OR spent + held <= spend_limit OR held = 0)
);
CREATE INDEX keys_user ON keys (user_account_id);
CREATE INDEX keys_prefix ON keys (prefix);
CREATE INDEX keys_revoked_at ON keys (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE holds (
    call_id              TEXT COLLATE "C" PRIMARY KEY,
    key_id               TEXT COLLATE "C" REFERENCES keys (id),
    user_account_id      BIGINT NOT NULL REFERENCES accounts (id),
    developer_account_id BIGINT NOT NULL REFERENCES accounts (id),
    server               TEXT COLLATE "C" NOT NULL,
    method               TEXT COLLATE "C" NOT NULL,
    name                 TEXT COLLATE "C" NOT NULL,
    amount               BIGINT NOT NULL CHECK (amount > 0),
    fee                  BIGINT NOT NULL CHECK (fee >= 0 AND fee <= amount),
    state                TEXT COLLATE "C" NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'captured', 'voided')),
    owner                TEXT COLLATE "C" NOT NULL,
    created_at           DOUBLE PRECISION NOT NULL,
    lease_expires_at     DOUBLE PRECISION NOT NULL,
    settled_at           DOUBLE PRECISION,
    charge_id            TEXT COLLATE "C" REFERENCES transfers (id),
    CHECK ((state = 'captured') = (charge_id IS NOT NULL))
);
CREATE INDEX holds_pending_lease ON holds (lease_expires_at) WHERE state = 'pending';
CREATE INDEX holds_user_pending ON holds (user_account_id) WHERE state = 'pending';
CREATE INDEX holds_key_pending ON holds (key_id) WHERE state = 'pending';

-- A charge is the capture transfer plus what the hold said about the call.
CREATE TABLE charges (
    id                   TEXT COLLATE "C" PRIMARY KEY REFERENCES transfers (id),
    seq                  BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
    call_id              TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES holds (call_id),
    user_account_id      BIGINT NOT NULL REFERENCES accounts (id),
    developer_account_id BIGINT NOT NULL REFERENCES accounts (id),
    amount               BIGINT NOT NULL CHECK (amount > 0),
    fee                  BIGINT NOT NULL CHECK (fee >= 0 AND fee <= amount),
    refunded             BIGINT NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount),
    balance_after        BIGINT NOT NULL,
    created_at           DOUBLE PRECISION NOT NULL
);
CREATE INDEX charges_user_recent ON charges (user_account_id, created_at, seq);
"""

_SERVICE_TOKENS_AND_PAYOUTS = """
CREATE TABLE service_tokens (
    id                   TEXT COLLATE "C" PRIMARY KEY,
    developer_account_id BIGINT NOT NULL REFERENCES accounts (id),
    servers              TEXT[] NOT NULL CHECK (cardinality(servers) > 0),
    token_hash           TEXT COLLATE "C" NOT NULL UNIQUE,
    prefix               TEXT COLLATE "C" NOT NULL,
    created_at           DOUBLE PRECISION NOT NULL,
    revoked_at           DOUBLE PRECISION
);
CREATE INDEX service_tokens_developer ON service_tokens (developer_account_id);
CREATE INDEX service_tokens_prefix ON service_tokens (prefix);

-- pending -> settled | failed. Each transition writes one transfer whose reference is the payout
-- id, so the unique (kind, reference) index makes a second settle or fail transfer impossible.
CREATE TABLE payouts (
    id                   TEXT COLLATE "C" PRIMARY KEY,
    developer_account_id BIGINT NOT NULL REFERENCES accounts (id),
    amount               BIGINT NOT NULL CHECK (amount > 0),
    state                TEXT COLLATE "C" NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'settled', 'failed')),
    reference            TEXT COLLATE "C",
    transfer_id          TEXT COLLATE "C" NOT NULL UNIQUE REFERENCES transfers (id),
    created_at           DOUBLE PRECISION NOT NULL,
    completed_at         DOUBLE PRECISION,
    CHECK ((state = 'pending') = (completed_at IS NULL)),
    CHECK ((state = 'settled') = (reference IS NOT NULL))
);
CREATE INDEX payouts_developer ON payouts (developer_account_id, created_at);
CREATE INDEX payouts_pending ON payouts (state) WHERE state = 'pending';

CREATE INDEX charges_developer_recent ON charges (developer_account_id, created_at, id);
CREATE INDEX charges_created ON charges (created_at, id);
"""

# Every balance within +-MAX_BALANCE (``ledger.base``; 10^15 millicents, written out here because a
# shipped migration never changes). ADD CONSTRAINT checks the rows already there: should one be out of
# range, the migration (and so the upgrade) stops with this constraint's name, and the operator must
# bring that account back in range first. ``postgres._translate`` maps a violation to
# BalanceLimitExceeded (422) by the constraint's name.
BALANCE_LIMIT_CONSTRAINT = "accounts_balance_within_limit"
_BALANCE_LIMIT = """
ALTER TABLE accounts ADD CONSTRAINT accounts_balance_within_limit
    CHECK (balance BETWEEN -1000000000000000 AND 1000000000000000);
"""

# Refund references (idempotency keys) namespaced by actor: the rule and the reason are those of the
# SQLite migration of the same name (``migrations_sqlite._REFUND_REFERENCES``). NULL first, then the
# new value: a unique index is checked row by row, and rewriting in place could meet a
# not-yet-rewritten reference in transfers_kind_reference.
_REFUND_REFERENCES = """
CREATE TEMP TABLE refund_references_0006 ON COMMIT DROP AS
SELECT t.id AS id,
       CASE WHEN left(t.reference, length(d.name) + 1) = d.name || ':' THEN 'dev:' || t.reference
            ELSE 'admin:' || t.reference END AS reference
FROM transfers t
JOIN charges c ON c.id = t.charge_id
JOIN accounts d ON d.id = c.developer_account_id
WHERE t.kind = 'refund' AND t.reference IS NOT NULL;
UPDATE transfers t SET reference = NULL FROM refund_references_0006 r WHERE t.id = r.id;
UPDATE transfers t SET reference = r.reference FROM refund_references_0006 r WHERE t.id = r.id;
DROP TABLE refund_references_0006;
"""

_FREE_CALLS = """
CREATE TABLE free_calls (
    call_id    TEXT PRIMARY KEY,
    user_name  TEXT NOT NULL,
    server     TEXT NOT NULL,
    scope      TEXT NOT NULL,
    day        TEXT NOT NULL,
    name       TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'used')),
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX free_calls_by_day ON free_calls (user_name, server, scope, day);
"""

# Clawbacks: the rule and the reason are those of the SQLite migration of the same name
# (``sqlite.migrations._CLAWBACKS``): a user's balance may go negative (and below what it holds)
# through a clawback only; the stores' conditional UPDATEs still refuse every debit that would take a
# non-world account's available below zero, and the balance limit's CHECK still bounds it.
_CLAWBACKS = """
ALTER TABLE accounts DROP CONSTRAINT accounts_user_available_not_negative;
ALTER TABLE accounts DROP CONSTRAINT accounts_balance_not_negative;
ALTER TABLE accounts ADD CONSTRAINT accounts_balance_not_negative CHECK (kind IN ('world', 'user') OR balance >= 0);
ALTER TABLE transfers DROP CONSTRAINT transfers_kind_check;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_check
    CHECK (kind IN ('topup', 'charge', 'refund', 'payout', 'payout_settle', 'payout_fail', 'clawback',
                     'payout_reversal'));
CREATE INDEX transfers_clawbacks ON transfers (account_id) WHERE kind = 'clawback';
"""

# A key's name and when it last authenticated a call: the rule and the reason are those of the SQLite
# migration of the same name (``sqlite.migrations._KEY_NAMES_AND_LAST_USE``). A nullable column without
# a default rewrites no row; the CHECK scans ``keys`` once (all NULL) under the ALTER's lock.
_KEY_NAMES_AND_LAST_USE = """
ALTER TABLE keys ADD COLUMN name TEXT COLLATE "C" CHECK (name IS NULL OR char_length(name) BETWEEN 1 AND 100),
    ADD COLUMN last_used_at DOUBLE PRECISION;
"""

# The no-overdraft guard back in the database, below zero only by a clawback's debt: the rule and
# the reason are those of the SQLite migration of the same name (``sqlite.migrations._USER_DEBT``),
# here as CHECKs. The UPDATE sets existing rows to their current shortfall before the CHECK scans them.
_USER_DEBT = """
ALTER TABLE accounts ADD COLUMN debt BIGINT NOT NULL DEFAULT 0;
UPDATE accounts SET debt = GREATEST(0, held - balance) WHERE kind = 'user' AND held > balance;
ALTER TABLE accounts ADD CONSTRAINT accounts_debt_only_users CHECK (debt >= 0 AND (kind = 'user' OR debt = 0)),
    ADD CONSTRAINT accounts_user_available_within_debt CHECK (kind <> 'user' OR balance - held >= -debt);
"""

# (name, SQL script), applied in order; each script runs as one multi-statement execute.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("0001_initial", _INITIAL),
    ("0002_service_tokens_and_payouts", _SERVICE_TOKENS_AND_PAYOUTS),
    # verify looks postings up by (transfer, account): without it SQLite's planner scanned every posting
    # of a busy user per captured hold (quadratic; minutes for 50,000 charges)
    (
        "0003_postings_by_transfer_and_account",
        "CREATE INDEX postings_transfer_account ON postings (transfer_id, account_id);",
    ),
    # Every index is written by each hold or capture. These answered no query another index does not:
    # postings_transfer is a prefix of postings_transfer_account; holds_user_pending and
    # holds_key_pending served only verify's sums over pending holds, which holds_pending_lease (the
    # same rows) serves as well. (SQLite's charges_developer, dropped by its 0004, never existed here.)
    # holds before postings: the order in which a capture of a replica still running the previous
    # version locks them, so the migration's exclusive locks cannot form a cycle with it.
    (
        "0004_drop_redundant_hot_path_indexes",
        """
DROP INDEX holds_user_pending;
DROP INDEX holds_key_pending;
DROP INDEX postings_transfer;
""",
    ),
    ("0005_account_balance_limit", _BALANCE_LIMIT),
    ("0006_refund_references_per_actor", _REFUND_REFERENCES),
    # Free allowances (price table's free_calls_per_day): one row per free call, counted per user,
    # server, scope ("*" or a name) and UTC day. Not money: no posting, no balance.
    ("0007_free_calls", _FREE_CALLS),
    # A user's balance may go negative through a clawback (payment provider refunds and disputes).
    ("0008_clawbacks", _CLAWBACKS),
    # A key's optional name, and when it last authenticated a call (flushed from memory, not per call).
    ("0009_key_names_and_last_use", _KEY_NAMES_AND_LAST_USE),
    # The no-overdraft guard in the database again, below zero only by a clawback's debt.
    ("0010_user_debt_guard", _USER_DEBT),
)
