"""The ledger interface: every store (SQLite, PostgreSQL) implements ``Ledger``.

All amounts are integers in millicents (see ``gateway.money``). Balances are the sum of an
account's postings; every transfer's postings sum to zero.

Accounts and sign convention (balance = sum of postings):
  user             money the user can spend (top-ups credit it, charges debit it); never below held
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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
    kind: str  # topup | charge | refund | payout | payout_settle | payout_fail
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
EXPORT_TABLES: tuple[str, ...] = tuple(EXPORT_COLUMNS)  # dependency order: import in this order

# One dumped row: (table, {column: value}).
ExportRow = tuple[str, dict[str, Any]]


class Ledger(Protocol):
    """What every ledger store provides. Methods raise ``gateway.errors`` types."""

    async def open(self) -> None:
        """Connect, create the schema / apply migrations, create system accounts."""

    async def close(self) -> None: ...

    # accounts
    async def create_user(self, name: str) -> Account:
        """Raises AlreadyExists."""

    async def create_developer(self, name: str) -> Account:
        """Raises AlreadyExists."""

    async def get_account(self, kind: AccountKind, name: str) -> Account:
        """Raises NotFound."""

    async def developer_names(self) -> set[str]: ...

    async def topup(self, user: str, amount: int, reference: str | None = None) -> Transfer:
        """Credit a user from the world account. A repeated non-None reference returns the original
        transfer with ``replayed=True``; the same reference for another user/amount raises
        IdempotencyConflict. Raises NotFound for an unknown user, InvalidInput for amount <= 0,
        AmountTooLarge for amount > MAX_AMOUNT, BalanceLimitExceeded when the user's balance would pass
        MAX_BALANCE or the world account go below -MAX_BALANCE (nothing written)."""

    # keys
    async def create_key(
        self,
        *,
        user: str,
        server: str,
        key_hash: str,
        prefix: str,
        expires_at: float | None,
        spend_limit: int | None,
    ) -> KeyRecord: ...

    async def find_key(self, key_hash: str) -> KeyRecord | None: ...

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        """Raises NotFound, or InvalidInput when a prefix matches several keys."""

    async def revoked_since(self, since: float) -> list[str]:
        """Ids of keys revoked at or after ``since`` (for cache invalidation)."""

    # two-phase money movement
    async def hold(self, req: HoldRequest) -> HoldOutcome:
        """Reserve ``req.amount``: in one transaction, guarded by the database, so concurrent holds
        can never make available balance (or the key's remaining cap) negative."""

    async def capture(self, call_id: str, amount: int | None = None) -> Charge:
        """Post a pending hold as a charge (user -amount, developer +amount-fee, platform +fee) and
        release the rest of the hold. Idempotent: capturing a captured hold returns the same Charge
        with ``replayed=True`` (whatever ``amount`` the repeat names).
        Raises NotFound for an unknown call_id, Conflict if the hold was voided,
        InvalidInput if amount > held amount, BalanceLimitExceeded if a credit would take an account
        past ``MAX_BALANCE``."""

    async def void(self, call_id: str) -> bool:
        """Release a pending hold. Returns False if it was not pending (already captured/voided)."""

    async def renew(self, call_ids: Sequence[str], lease_s: float) -> None:
        """Extend the lease of these pending holds to now + lease_s."""

    async def sweep(self, now: float | None = None) -> int:
        """Void every pending hold whose lease has lapsed; returns how many."""

    async def get_hold(self, call_id: str) -> HoldInfo:
        """Raises NotFound."""

    async def charge(self, req: HoldRequest) -> ChargeResult:
        """Hold and capture in ONE transaction (the service API's one-step charge). Idempotent by
        ``req.call_id``: a repeat with the same user/developer/server/name/amount returns the original
        Charge (status REPLAYED); a repeat with different fields raises IdempotencyConflict; a repeat
        of a call_id whose hold was voided raises Conflict. ``hold`` applies the same field check to a
        replayed call_id."""

    async def refund(self, charge_id: str, amount: int | None = None, reference: str | None = None) -> Transfer:
        """A reversal transfer (never an edit): user +amount, developer and platform_fee back
        proportionally. Cumulative refunds never exceed the charge (guarded in SQL); a developer whose
        earnings were paid out cannot go negative (Conflict). A repeated non-None reference returns
        the original refund transfer with replayed=True. Callers namespace the reference by actor
        (``operator_reference``, ``developer_reference``)."""

    async def get_charge(self, charge_id: str) -> Charge:
        """Raises NotFound."""

    async def list_charges(
        self,
        *,
        developer: str | None = None,
        user: str | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Charge]:
        """Newest first; ``before`` is the id of the last charge of the previous page (cursor)."""

    # service tokens
    async def create_service_token(
        self, *, developer: str, servers: Sequence[str], token_hash: str, prefix: str
    ) -> ServiceToken:
        """Raises NotFound for an unknown developer."""

    async def find_service_token(self, token_hash: str) -> ServiceToken | None: ...

    async def list_service_tokens(self, developer: str | None = None) -> list[ServiceToken]: ...

    async def revoke_service_token(self, id_or_prefix: str) -> ServiceToken:
        """Raises NotFound, or InvalidInput when a prefix matches several tokens."""

    # payouts
    async def create_payout(self, developer: str, amount: int | None = None) -> Payout:
        """Move earnings (all of them when amount is None) to payout_clearing, pending. Guarded in
        SQL: never more than the developer's balance, even for concurrent payouts (Conflict with the
        available amount otherwise; InvalidInput for amount <= 0 or nothing to pay)."""

    async def settle_payout(self, payout_id: str, reference: str) -> Payout:
        """pending → settled: payout_clearing → world. Settling a settled payout with the same
        reference returns it; any other transition out of a final state raises Conflict."""

    async def fail_payout(self, payout_id: str) -> Payout:
        """pending → failed: the money returns from payout_clearing to the developer."""

    async def list_payouts(self, developer: str | None = None) -> list[Payout]: ...

    async def statement(self, developer: str, *, limit: int = 100, before: str | None = None) -> list[StatementLine]:
        """Movements of a developer's earnings, newest first, paginated by transfer id cursor."""

    async def earnings_breakdown(self, developer: str) -> list[EarningsBreakdown]:
        """Per server and per name (tool/feature) totals."""

    # reporting
    async def user_summary(self, user: str, recent: int = 10) -> UserSummary: ...

    async def usage(self, user: str | None = None, server: str | None = None) -> list[UsageRow]: ...

    async def earnings(self, developer: str) -> Earnings: ...

    async def verify(self) -> list[str]:
        """Check every invariant on one consistent snapshot; return human-readable violations
        (empty list = clean)."""

    # maintenance
    async def migrate(self) -> list[str]:
        """Open the store if needed, applying missing migrations; return the names of the
        migrations this call applied (empty when the schema was already current)."""

    async def applied_migrations(self) -> list[str]:
        """Names of every migration applied to the open store, in order."""

    async def export_rows(self) -> list[ExportRow]:
        """Every row of every table (``EXPORT_TABLES`` order, exact values, ``EXPORT_COLUMNS``
        shape), read from one consistent snapshot."""

    async def import_rows(self, rows: Iterable[ExportRow]) -> dict[str, int]:
        """Load an export into this store, which must be empty (no user, developer or transfer;
        Conflict otherwise), in one transaction, keeping every id; returns rows per table.
        Raises InvalidInput for rows that do not fit (nothing is written then)."""
