"""The SQLite ledger schema, as named migrations applied in order.

Each migration runs in the same ``BEGIN IMMEDIATE`` transaction as the ``schema_migrations`` row
that records it, so a crash (or a second process opening the same file) never leaves a schema
half-applied. Never edit a migration that has shipped: append a new one.

Guards live in the database: ``CHECK`` constraints make an overdraft impossible even for a buggy
caller, and the conditional ``UPDATE``s of the ``sqlite`` package turn "would overdraw" into zero rows.
"""

from __future__ import annotations

SCHEMA_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
)
"""

_INITIAL = """
CREATE TABLE accounts (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL
               CHECK (kind IN ('user', 'developer', 'world', 'platform_fee', 'payout_clearing')),
    name       TEXT NOT NULL,
    balance    INTEGER NOT NULL DEFAULT 0,
    held       INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    UNIQUE (kind, name),
    CHECK (held >= 0),
    CHECK (kind <> 'user' OR balance - held >= 0),
    CHECK (kind = 'world' OR balance >= 0)
);

CREATE TABLE transfers (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL
               CHECK (kind IN ('topup', 'charge', 'refund', 'payout', 'payout_settle', 'payout_fail')),
    amount     INTEGER NOT NULL CHECK (amount > 0),
    reference  TEXT,
    account_id INTEGER REFERENCES accounts (id),  -- the user (top-ups, charges, refunds)
    charge_id  TEXT REFERENCES transfers (id),    -- refunds: the charge they reverse
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX transfers_kind_reference ON transfers (kind, reference) WHERE reference IS NOT NULL;
CREATE INDEX transfers_charge ON transfers (charge_id) WHERE charge_id IS NOT NULL;

CREATE TABLE postings (
    id          INTEGER PRIMARY KEY,
    transfer_id TEXT NOT NULL REFERENCES transfers (id),
    account_id  INTEGER NOT NULL REFERENCES accounts (id),
    amount      INTEGER NOT NULL CHECK (amount <> 0)
);
CREATE INDEX postings_transfer ON postings (transfer_id);
CREATE INDEX postings_account ON postings (account_id);

CREATE TRIGGER postings_are_immutable_update BEFORE UPDATE ON postings
BEGIN
    SELECT RAISE(ABORT, 'postings are immutable');
END;
CREATE TRIGGER postings_are_immutable_delete BEFORE DELETE ON postings
BEGIN
    SELECT RAISE(ABORT, 'postings are immutable');
END;

CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    user_account_id INTEGER NOT NULL REFERENCES accounts (id),
    server          TEXT NOT NULL,
    key_hash        TEXT NOT NULL UNIQUE,
    prefix          TEXT NOT NULL,
    created_at      REAL NOT NULL,
    expires_at      REAL,
    revoked_at      REAL,
    spend_limit     INTEGER CHECK (spend_limit IS NULL OR spend_limit >= 0),
    spent           INTEGER NOT NULL DEFAULT 0 CHECK (spent >= 0),
    held            INTEGER NOT NULL DEFAULT 0 CHECK (held >= 0)
);
CREATE INDEX keys_user ON keys (user_account_id);
CREATE INDEX keys_prefix ON keys (prefix);
CREATE INDEX keys_revoked_at ON keys (revoked_at) WHERE revoked_at IS NOT NULL;

CREATE TABLE holds (
    call_id              TEXT PRIMARY KEY,
    key_id               TEXT REFERENCES keys (id),
    user_account_id      INTEGER NOT NULL REFERENCES accounts (id),
    developer_account_id INTEGER NOT NULL REFERENCES accounts (id),
    server               TEXT NOT NULL,
    method               TEXT NOT NULL,
    name                 TEXT NOT NULL,
    amount               INTEGER NOT NULL CHECK (amount > 0),
    fee                  INTEGER NOT NULL CHECK (fee >= 0 AND fee <= amount),
    state                TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'captured', 'voided')),
    owner                TEXT NOT NULL,
    created_at           REAL NOT NULL,
    lease_expires_at     REAL NOT NULL,
    settled_at           REAL,
    charge_id            TEXT REFERENCES transfers (id),
    CHECK ((state = 'captured') = (charge_id IS NOT NULL))
);
CREATE INDEX holds_pending_lease ON holds (lease_expires_at) WHERE state = 'pending';
CREATE INDEX holds_user_pending ON holds (user_account_id) WHERE state = 'pending';
CREATE INDEX holds_key_pending ON holds (key_id) WHERE state = 'pending';

-- A charge is the capture transfer plus what the hold said about the call.
CREATE TABLE charges (
    id                   TEXT PRIMARY KEY REFERENCES transfers (id),
    call_id              TEXT NOT NULL UNIQUE REFERENCES holds (call_id),
    user_account_id      INTEGER NOT NULL REFERENCES accounts (id),
    developer_account_id INTEGER NOT NULL REFERENCES accounts (id),
    amount               INTEGER NOT NULL CHECK (amount > 0),
    fee                  INTEGER NOT NULL CHECK (fee >= 0 AND fee <= amount),
    refunded             INTEGER NOT NULL DEFAULT 0 CHECK (refunded >= 0 AND refunded <= amount),
    balance_after        INTEGER NOT NULL,
    created_at           REAL NOT NULL
);
CREATE INDEX charges_user_recent ON charges (user_account_id, created_at);
CREATE INDEX charges_developer ON charges (developer_account_id);
"""

# Service tokens (the developer-facing HTTP API) and payouts of developer earnings.
_SERVICE_AND_PAYOUTS = """
CREATE TABLE service_tokens (
    id                   TEXT PRIMARY KEY,
    developer_account_id INTEGER NOT NULL REFERENCES accounts (id),
    servers              TEXT NOT NULL,  -- JSON array of server names, in the order given
    token_hash           TEXT NOT NULL UNIQUE,
    prefix               TEXT NOT NULL,
    created_at           REAL NOT NULL,
    revoked_at           REAL
);
CREATE INDEX service_tokens_developer ON service_tokens (developer_account_id);
CREATE INDEX service_tokens_prefix ON service_tokens (prefix);

-- A payout moves earnings developer -> payout_clearing (transfer kind 'payout') when created, then
-- payout_clearing -> world when settled ('payout_settle') or back to the developer when it failed
-- ('payout_fail'). Each of these transfers carries the payout id as its reference, so the unique
-- (kind, reference) index allows at most one of each per payout.
CREATE TABLE payouts (
    id                   TEXT PRIMARY KEY,
    developer_account_id INTEGER NOT NULL REFERENCES accounts (id),
    amount               INTEGER NOT NULL CHECK (amount > 0),
    state                TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'settled', 'failed')),
    reference            TEXT,  -- the bank / transfer reference given on settle
    created_at           REAL NOT NULL,
    completed_at         REAL,
    CHECK ((state = 'pending') = (completed_at IS NULL)),
    CHECK ((state = 'settled') = (reference IS NOT NULL))
);
CREATE INDEX payouts_developer ON payouts (developer_account_id, created_at);
CREATE INDEX payouts_pending ON payouts (state) WHERE state = 'pending';

CREATE INDEX charges_developer_recent ON charges (developer_account_id, created_at, id);
CREATE INDEX charges_created ON charges (created_at, id);
"""

# Every balance within +-MAX_BALANCE (``ledger.base``; 10^15 millicents, written out here because a
# shipped migration never changes), and an INTEGER: SQLite turns an overflowing ``balance + ?`` into
# a REAL, which is how ten top-ups of 10^15 cents once made a float balance. SQLite cannot add a CHECK
# to an existing table; the alternative, rebuilding ``accounts`` (create a new table, copy, drop, rename),
# needs ``PRAGMA foreign_keys = OFF``, which SQLite ignores inside the transaction each migration runs
# in, while six tables reference ``accounts`` and renaming it rewrites their references; it would also
# copy every account under the write lock. BEFORE triggers guard every writer of the file exactly as a
# CHECK would (the CLI, another gateway, an ``sqlite3`` shell) and cost one comparison per balance
# update (``UPDATE OF balance``: holds and voids, which change only ``held``, do not fire them; ``held``
# needs no trigger of its own, as the CHECKs keep it between 0 and a user's balance, and 0 elsewhere).
# Unlike a CHECK they do not judge rows written before: ``ledger verify`` reports those, and their
# next balance change is refused until it brings them back in range. The message starts with
# ``BALANCE_LIMIT_TRIGGER``, by which ``sqlite._storage_error`` recognises the refusal.
BALANCE_LIMIT_TRIGGER = "accounts_balance_within_limit"
_BALANCE_LIMIT = """
CREATE TRIGGER accounts_balance_within_limit_insert BEFORE INSERT ON accounts
WHEN typeof(NEW.balance) <> 'integer' OR NEW.balance > 1000000000000000 OR NEW.balance < -1000000000000000
BEGIN
    SELECT RAISE(ABORT, 'accounts_balance_within_limit: a balance must be an integer within +-10^15 millicents');
END;
CREATE TRIGGER accounts_balance_within_limit_update BEFORE UPDATE OF balance ON accounts
WHEN typeof(NEW.balance) <> 'integer' OR NEW.balance > 1000000000000000 OR NEW.balance < -1000000000000000
BEGIN
    SELECT RAISE(ABORT, 'accounts_balance_within_limit: a balance must be an integer within +-10^15 millicents');
END;
"""

# Refund references (idempotency keys) namespaced by actor (``ledger.base.operator_reference``,
# ``developer_reference``): the service API stored "<developer>:<key>" and the operator the bare key,
# so an operator key "acme:k" and developer acme's key "k" were one key. Earlier rows move by the rule
# of ``base.namespaced_legacy_refund_reference``: a reference starting with the refunded charge's
# developer and ':' is that developer's, any other the operator's. Through a temporary table and NULL
# first: rewriting in place could meet a not-yet-rewritten reference in the unique (kind, reference) index.
_REFUND_REFERENCES = """
CREATE TEMP TABLE refund_references_0006 AS
SELECT t.id AS id,
       CASE WHEN substr(t.reference, 1, length(d.name) + 1) = d.name || ':' THEN 'dev:' || t.reference
            ELSE 'admin:' || t.reference END AS reference
FROM transfers t
JOIN charges c ON c.id = t.charge_id
JOIN accounts d ON d.id = c.developer_account_id
WHERE t.kind = 'refund' AND t.reference IS NOT NULL;
UPDATE transfers SET reference = NULL WHERE id IN (SELECT id FROM temp.refund_references_0006);
UPDATE transfers SET reference = (SELECT r.reference FROM temp.refund_references_0006 r WHERE r.id = transfers.id)
WHERE id IN (SELECT id FROM temp.refund_references_0006);
DROP TABLE temp.refund_references_0006;
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
    created_at REAL NOT NULL
);
CREATE INDEX free_calls_by_day ON free_calls (user_name, server, scope, day);
"""

# Clawbacks (``ledger.base``: money a payment provider took back, a refund or a lost dispute, taken
# from a user even below zero), and payout reversals (a settled payout's transfer came back: world ->
# developer, at most once per payout by the unique (kind, reference) index). A user's balance may now
# be negative and below what it holds; every other account keeps its guards, and a hold still needs
# ``balance - held >= amount`` (the stores' conditional UPDATEs), so a user in debt is refused every
# priced call until a top-up covers the debt.
# SQLite cannot drop a CHECK: the table definitions are rewritten in ``sqlite_schema`` (SQLite's
# documented procedure for removing or loosening CHECK constraints: every existing row satisfies the
# looser ones, so nothing is rebuilt), ``writable_schema = RESET`` re-reads the schema, and the index
# that follows bumps the schema cookie, so every other connection to the file re-reads it too. The
# temporary table refuses the migration (rolling it back) unless all three definitions were rewritten.
_CLAWBACKS = """
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
SET sql = replace(replace(sql,
    'CHECK (kind <> ''user'' OR balance - held >= 0)', 'CHECK (kind <> ''user'' OR held >= 0)'),
    'CHECK (kind = ''world'' OR balance >= 0)', 'CHECK (kind IN (''world'', ''user'') OR balance >= 0)')
WHERE type = 'table' AND name = 'accounts';
UPDATE sqlite_schema
SET sql = replace(sql, '''payout_settle'', ''payout_fail''))',
    '''payout_settle'', ''payout_fail'', ''clawback'', ''payout_reversal''))')
WHERE type = 'table' AND name = 'transfers';
PRAGMA writable_schema = RESET;
CREATE TEMP TABLE migration_0008_checks (rewritten INTEGER NOT NULL CHECK (rewritten = 3));
INSERT INTO temp.migration_0008_checks (rewritten)
SELECT (SELECT COUNT(*) FROM sqlite_schema WHERE name = 'accounts' AND instr(sql, 'OR held >= 0)') > 0)
     + (SELECT COUNT(*) FROM sqlite_schema WHERE name = 'accounts' AND instr(sql, 'IN (''world'', ''user'')') > 0)
     + (SELECT COUNT(*) FROM sqlite_schema WHERE name = 'transfers' AND instr(sql, '''payout_reversal''') > 0);
DROP TABLE temp.migration_0008_checks;
CREATE INDEX transfers_clawbacks ON transfers (account_id) WHERE kind = 'clawback';
"""

# A key's name (given by its user or the operator, shown on the keys list: at most 100 characters,
# ``rows.require_key_name`` refuses control and other unprintable characters) and when it last
# authenticated a call: written by ``touch_keys``, which each gateway process calls with the times it
# gathered in memory at most every ``auth.LAST_USED_FLUSH_S`` seconds (never once per call). Both
# NULL for every key there is: ADD COLUMN rewrites no row.
_KEY_NAMES_AND_LAST_USE = """
ALTER TABLE keys ADD COLUMN name TEXT CHECK (name IS NULL OR length(name) BETWEEN 1 AND 100);
ALTER TABLE keys ADD COLUMN last_used_at REAL;
"""

# The database guard against overdraft that 0008 loosened, back with room for clawbacks only. A
# user's ``debt`` is how far below zero its available balance (balance - held) may be: raised only by
# a clawback, to the shortfall it leaves (``MAX(debt, held - balance)`` after it), lowered by each
# credit (a top-up or refund: ``MAX(0, MIN(debt, held - balance))`` after it; ``common._post``), never
# by a void (a void only raises the available balance, so a debt left higher just stays a looser
# bound until the next credit). A hold needs ``balance - held >= amount`` as before; a capture keeps
# balance - held (or raises it), so with outstanding holds a clawback, then captures and top-ups,
# all pass, while a buggy write that raises ``held`` or debits a balance past ``-debt`` (0 for a user
# who never was clawed back, or whose credits since covered it) is refused by the database for every
# writer of the file. Triggers, as for 0005 (SQLite cannot add a table CHECK): ``UPDATE OF`` the
# three columns, one comparison per hold or capture. Existing rows start at their current shortfall.
# The message starts with ``USER_DEBT_TRIGGER``, by which ``sqlite._storage_error`` recognises it.
USER_DEBT_TRIGGER = "accounts_user_available_within_debt"
_USER_DEBT = """
ALTER TABLE accounts ADD COLUMN debt INTEGER NOT NULL DEFAULT 0;
UPDATE accounts SET debt = MAX(0, held - balance) WHERE kind = 'user';
CREATE TRIGGER accounts_user_available_within_debt_insert BEFORE INSERT ON accounts
WHEN typeof(NEW.debt) <> 'integer' OR NEW.debt < 0 OR (NEW.kind <> 'user' AND NEW.debt <> 0)
     OR (NEW.kind = 'user' AND NEW.balance - NEW.held < -NEW.debt)
BEGIN
    SELECT RAISE(ABORT, 'accounts_user_available_within_debt: below zero only by a clawback''s debt');
END;
CREATE TRIGGER accounts_user_available_within_debt_update BEFORE UPDATE OF balance, held, debt ON accounts
WHEN typeof(NEW.debt) <> 'integer' OR NEW.debt < 0 OR (NEW.kind <> 'user' AND NEW.debt <> 0)
     OR (NEW.kind = 'user' AND NEW.balance - NEW.held < -NEW.debt)
BEGIN
    SELECT RAISE(ABORT, 'accounts_user_available_within_debt: below zero only by a clawback''s debt');
END;
"""

# (name, SQL script). Statements are separated by ';' at the end of a line.
MIGRATIONS: tuple[tuple[str, str], ...] = (
    ("0001_initial", _INITIAL),
    ("0002_service_tokens_and_payouts", _SERVICE_AND_PAYOUTS),
    # verify looks postings up by (transfer, account): without it SQLite's planner scanned every posting
    # of a busy user per captured hold (quadratic; minutes for 50,000 charges)
    (
        "0003_postings_by_transfer_and_account",
        "CREATE INDEX postings_transfer_account ON postings (transfer_id, account_id);",
    ),
    # Every index is written by each hold or capture. These four answered no query another index
    # does not: postings_transfer and charges_developer are prefixes of postings_transfer_account
    # and charges_developer_recent; holds_user_pending and holds_key_pending served only verify's
    # sums over pending holds, which holds_pending_lease (the same rows) serves as well.
    (
        "0004_drop_redundant_hot_path_indexes",
        """
DROP INDEX postings_transfer;
DROP INDEX charges_developer;
DROP INDEX holds_user_pending;
DROP INDEX holds_key_pending;
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
