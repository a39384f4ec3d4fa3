"""The ledger's vocabulary: the records every store (SQLite, PostgreSQL) reads and writes, and its
limits. The interfaces, one per concern, are in ``gateway.ledger.interfaces``.

All amounts are integers in millicents (see ``gateway.money``). Balances are the sum of an
account's postings; every transfer's postings sum to zero.

Accounts and sign convention (balance = sum of postings):
  user             money the user can spend (top-ups credit it, charges debit it); never below held,
                   except through a clawback (the payment provider took money back: a refund, a
                   lost dispute), which may leave it negative; no hold passes until it is covered
  developer        earnings not yet paid out (charges credit it, payouts debit it)
  world            the outside world: top-ups debit it, settled payouts credit it (may be negative)
  platform_fee     the operator's fee income
  payout_clearing  earnings on their way out (pending payouts)

A *hold* is a pending two-phase transfer keyed by a ``call_id``: it reserves ``amount`` of the
user's available balance (and of the key's spending cap) until it is captured (posted as a
charge transfer) or voided. Holds are leases owned by one gateway process (``owner``) that renews
them while the call runs; the sweeper voids holds whose lease has lapsed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

# The most any account may hold, in millicents: 10^12 cents (10 billion dollars). The world account
# (money that entered the ledger) may go no lower than its negative, so the money in the ledger as a
# whole is bounded too. Every sum the ledger keeps (a balance plus one request's amount, a balance
# plus a batch's deltas, the sum of every posting) then stays far inside a signed 64-bit integer:
# without the bound, SQLite silently turned an overflowing ``balance + ?`` into a REAL (a float
# balance that crashed ``ledger verify`` and ``users show``).
# Enforced by the stores (their conditional UPDATEs and batch checks refuse with BalanceLimitExceeded,
# 422, writing nothing) and by the database itself (a CHECK on PostgreSQL, triggers on SQLite:
# migrations 0005), so even a writer that skips the stores' checks cannot store such a balance.
MAX_BALANCE = 10**15
# The most one request may move (top-up, charge, hold, capture, refund, payout), in millicents.
MAX_AMOUNT = MAX_BALANCE

# Idempotency namespaces of refund references (``Ledger.refund(reference=...)``): each actor's keys
# live apart, so one actor's key can never replay (or conflict with) another's. The stored reference
# is the namespace prefix followed by the key the actor sent (migration 0006 moved earlier rows).
OPERATOR_REFERENCE_PREFIX = "admin:"  # the operator: the admin API's Idempotency-Key and the CLI's --reference
DEVELOPER_REFERENCE_PREFIX = "dev:"  # a developer through the service API: "dev:<developer>:<key>"


def operator_reference(key: str) -> str:
    """The stored refund reference for an idempotency key the operator sent (admin API or CLI)."""
    return OPERATOR_REFERENCE_PREFIX + key


def developer_reference(developer: str, key: str) -> str:
    """The stored refund reference for an idempotency key ``developer`` sent through the service API.
    Developer names cannot contain ':' (``operations._NAME``), so the developer part is unambiguous."""
    return f"{DEVELOPER_REFERENCE_PREFIX}{developer}:{key}"


# Top-up and clawback references written by the payment provider integration (``gateway.payments``):
# "stripe:checkout:<session>", "stripe:refund:<refund>", "stripe:dispute:<dispute>:withdrawn", ... An
# operator's top-up reference may not start with it (``operations.topup`` refuses), so no hand-typed
# reference can pre-empt (or collide with) a credit the provider's webhook will make.
PROVIDER_REFERENCE_PREFIX = "stripe:"


def namespaced_legacy_refund_reference(reference: str, developer: str) -> str:
    """A refund reference stored before namespaces (migration 0006, dumps of version 1), given the
    developer of the refunded charge. The service API stored "<developer>:<key>", the operator the
    bare key: a reference that starts with the charge's developer and ':' becomes the developer's
    (what every service API refund wrote; only an operator key of exactly that shape is ambiguous),
    any other the operator's. The migrations apply the same rule in SQL."""
    if reference.startswith(developer + ":"):
        return DEVELOPER_REFERENCE_PREFIX + reference
    return OPERATOR_REFERENCE_PREFIX + reference


class AccountKind(enum.StrEnum):
    USER = "user"
    DEVELOPER = "developer"
    WORLD = "world"
    PLATFORM_FEE = "platform_fee"
    PAYOUT_CLEARING = "payout_clearing"


class HoldState(enum.StrEnum):
    PENDING = "pending"
    CAPTURED = "captured"
    VOIDED = "voided"


class HoldStatus(enum.StrEnum):
    OK = "ok"
    REPLAYED = "replayed"  # a hold with this call_id already exists; nothing new reserved
    INSUFFICIENT_FUNDS = "insufficient_funds"
    SPEND_LIMIT = "spend_limit"


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    kind: AccountKind
    name: str
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


KEY_NAME_MAX = 100  # characters of a key's name (migration 0010's CHECK)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str  # public identifier, e.g. "key_3f9a..."
    user: str
    server: str
    prefix: str  # the first characters of the secret, safe to show ("ap_3xK9q2")
    created_at: float  # unix seconds
    expires_at: float | None
    revoked_at: float | None
    spend_limit: int | None  # millicents; None = unlimited
    spent: int  # millicents captured through this key, net of refunds
    held: int  # millicents in pending holds through this key
    name: str | None = None  # what its user called it (at most KEY_NAME_MAX printable characters)
    # when it last authenticated a call: gathered in memory and written by ``touch_keys`` at most every
    # ``proxy.auth.LAST_USED_FLUSH_S`` seconds, so up to that much behind (None: never used)
    last_used_at: float | None = None


@dataclass(frozen=True, slots=True)
class HoldRequest:
    call_id: str  # unique per call; a second hold with the same id is a replay
    key_id: str | None  # None for holds not tied to a key (never in this issue)
    user: str
    developer: str
    server: str
    method: str  # "tools/call" | "resources/read" | "prompts/get" | "service"
    name: str  # tool name, resource URI or prompt name (or feature for the service API)
    amount: int  # millicents, > 0
    fee: int  # platform fee part of amount, 0 <= fee <= amount
    lease_s: float  # lease length; renewed by ``renew``
    owner: str  # id of the gateway process holding the lease


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    status: HoldStatus
    available: int  # user's available balance after the hold (or now, if refused)
    spend_remaining: int | None = None  # key's remaining cap after the hold (None = no cap)

    @property
    def ok(self) -> bool:
        return self.status in (HoldStatus.OK, HoldStatus.REPLAYED)


@dataclass(frozen=True, slots=True)
class FreeCall:
    """A call that may use a free allowance: the first ``limit`` priced calls of ``user`` on ``server``
    (``scope`` "*": the server's allowance) or on one name (``scope`` the name) each UTC ``day``."""

    call_id: str
    user: str
    server: str
    scope: str  # "*" (the server's allowance) or the name that has its own
    name: str  # tool name, resource URI or prompt name actually called
    day: str  # the UTC day, "YYYY-MM-DD"
    limit: int  # free calls per day


def charge_id_for(call_id: str) -> str:
    """The id of the charge that captures a call's hold: derived from the call id, so a receipt can name its charge
    before the capture commits, and unique because a call is captured at most once. (The PostgreSQL lone-capture
    function, ``postgres._LONE_FUNCTIONS``, derives it the same way in SQL.)"""
    return "ch_" + call_id


@dataclass(frozen=True, slots=True)
class Charge:
    id: str  # transfer id of the capture, e.g. "ch_..."; what receipts and refunds name
    call_id: str
    user: str
    developer: str
    server: str
    method: str
    name: str
    amount: int
    fee: int
    refunded: int
    created_at: float
    balance_after: int  # user's available balance right after the capture
    # True when ``Ledger.capture`` found the hold captured already and returned the charge an earlier
    # capture made (an idempotent replay). Not part of equality: it describes the answer, not the charge.
    replayed: bool = field(default=False, compare=False)

    @classmethod
    def captured(
        cls,
        call_id: str,
        *,
        user: str,
        developer: str,
        server: str,
        method: str,
        name: str,
        amount: int,
        fee: int,
        now: float,
        balance_after: int,
    ) -> Charge:
        """The charge a capture has just made: nothing of it refunded yet."""
        return cls(
            charge_id_for(call_id), call_id, user, developer, server, method, name, amount, fee, 0, now, balance_after
        )


@dataclass(frozen=True, slots=True)
class Transfer:
    id: str
    kind: str  # topup | charge | refund | payout | payout_settle | payout_fail | clawback
    amount: int
    reference: str | None
    created_at: float
    replayed: bool = False  # True when an idempotent call returned an earlier transfer


@dataclass(frozen=True, slots=True)
class UserSummary:
    user: str
    balance: int
    held: int
    available: int
    keys: list[KeyRecord] = field(default_factory=list)
    recent_charges: list[Charge] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class UsageRow:
    user: str
    server: str
    method: str
    name: str
    calls: int
    amount: int


@dataclass(frozen=True, slots=True)
class Earnings:
    developer: str
    earnings: int  # current balance of the developer account (not yet paid out)
    lifetime: int  # everything ever credited by charges, net of refunds


@dataclass(frozen=True, slots=True)
class ServiceToken:
    id: str  # public identifier, e.g. "tok_3f9a..."
    developer: str
    servers: tuple[str, ...]  # servers this token may charge for
    prefix: str  # "apst_3xK9q2Lm"
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class HoldInfo:
    """A hold as stored (for idempotency checks and the service API)."""

    call_id: str
    user: str
    developer: str
    server: str
    method: str
    name: str
    amount: int
    fee: int
    state: HoldState
    created_at: float
    expires_at: float  # lease expiry
    charge_id: str | None


@dataclass(frozen=True, slots=True)
class ChargeResult:
    """Outcome of a one-step charge: ``charge`` is set when ok (or replayed)."""

    status: HoldStatus
    available: int
    charge: Charge | None = None
    spend_remaining: int | None = None

    @property
    def ok(self) -> bool:
        return self.charge is not None


class PayoutState(enum.StrEnum):
    PENDING = "pending"
    SETTLED = "settled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Payout:
    id: str  # "po_..."
    developer: str
    amount: int
    state: PayoutState
    reference: str | None  # bank/transfer reference given on settle
    created_at: float
    completed_at: float | None


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One movement of a developer's earnings."""

    transfer_id: str
    kind: str  # charge | refund | payout | payout_fail
    amount: int  # signed change of the developer's earnings
    server: str | None
    name: str | None  # tool / resource / prompt / feature
    charge_id: str | None  # for refunds: the charge refunded
    created_at: float


@dataclass(frozen=True, slots=True)
class EarningsBreakdown:
    developer: str
    server: str
    name: str
    charges: int  # number of captured charges
    amount: int  # credited to the developer (after fees), net of refunds


# --- export / import (``agentpay ledger export`` / ``import``) ------------------------------------
# A store-neutral dump: every table, in dependency order, with each column's neutral type:
# "int" (64-bit integer: ids of accounts and postings, millicents), "float" (unix seconds, kept
# exactly: JSON floats round-trip), "text", "texts" (a list of text). None is NULL.
# Store-specific columns (PostgreSQL's ``charges.seq``) are not dumped: charges are dumped in
# insertion order and the target numbers them again in that order. ``payouts.transfer_id`` is the
# payout's own 'payout' transfer (stored on PostgreSQL, looked up by reference on SQLite).
EXPORT_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "accounts": (
        ("id", "int"),
        ("kind", "text"),
        ("name", "text"),
        ("balance", "int"),
        ("held", "int"),
        ("created_at", "float"),
    ),
    "transfers": (
        ("id", "text"),
        ("kind", "text"),
        ("amount", "int"),
        ("reference", "text"),
        ("account_id", "int"),
        ("charge_id", "text"),
        ("created_at", "float"),
    ),
    "postings": (("id", "int"), ("transfer_id", "text"), ("account_id", "int"), ("amount", "int")),
    "keys": (
        ("id", "text"),
        ("user_account_id", "int"),
        ("server", "text"),
        ("key_hash", "text"),
        ("prefix", "text"),
        ("created_at", "float"),
        ("expires_at", "float"),
        ("revoked_at", "float"),
        ("spend_limit", "int"),
        ("spent", "int"),
        ("held", "int"),
        ("name", "text"),  # dump version 3 (migration 0010); NULL when read from an older dump
        ("last_used_at", "float"),
    ),
    "holds": (
        ("call_id", "text"),
        ("key_id", "text"),
        ("user_account_id", "int"),
        ("developer_account_id", "int"),
        ("server", "text"),
        ("method", "text"),
        ("name", "text"),
        ("amount", "int"),
        ("fee", "int"),
        ("state", "text"),
        ("owner", "text"),
        ("created_at", "float"),
        ("lease_expires_at", "float"),
        ("settled_at", "float"),
        ("charge_id", "text"),
    ),
    "charges": (
        ("id", "text"),
        ("call_id", "text"),
        ("user_account_id", "int"),
        ("developer_account_id", "int"),
        ("amount", "int"),
        ("fee", "int"),
        ("refunded", "int"),
        ("balance_after", "int"),
        ("created_at", "float"),
    ),
    "service_tokens": (
        ("id", "text"),
        ("developer_account_id", "int"),
        ("servers", "texts"),
        ("token_hash", "text"),
        ("prefix", "text"),
        ("created_at", "float"),
        ("revoked_at", "float"),
    ),
    "payouts": (
        ("id", "text"),
        ("developer_account_id", "int"),
        ("amount", "int"),
        ("state", "text"),
        ("reference", "text"),
        ("transfer_id", "text"),
        ("created_at", "float"),
        ("completed_at", "float"),
    ),
}


def imported_debt(account: dict[str, Any]) -> int:
    """An imported account's debt (migration 0010; not in the dump): a user's shortfall, the
    tightest bound the database guard accepts for its balance and held."""
    if account["kind"] != AccountKind.USER.value:
        return 0
    return max(0, int(account["held"]) - int(account["balance"]))


EXPORT_TABLES: tuple[str, ...] = tuple(EXPORT_COLUMNS)  # dependency order: import in this order

# One dumped row: (table, {column: value}).
ExportRow = tuple[str, dict[str, Any]]
