"""The ledger's interfaces, one per concern. Every store implements all of them (``Ledger``); each
caller is given only the concern it uses (billing gets ``Holds``, the service API ``Charges`` and
``Keys``, …), so what a module can do to money is visible in its signature.

All amounts are integers in millicents. Methods raise ``gateway.errors`` types.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from gateway.ledger.base import (
    Account,
    AccountKind,
    Charge,
    ChargeResult,
    Earnings,
    EarningsBreakdown,
    ExportRow,
    FreeCall,
    HoldInfo,
    HoldOutcome,
    HoldRequest,
    KeyRecord,
    Payout,
    ServiceToken,
    StatementLine,
    Transfer,
    UsageRow,
    UserSummary,
)
from gateway.ledger.grants import GrantedCall, GrantFlush, GrantRequest, GrantState


class Store(Protocol):
    """The store's life: connecting, the schema and its migrations."""

    async def open(self) -> None:
        """Connect, create the schema / apply migrations, create system accounts."""

    async def close(self) -> None: ...

    async def migrate(self) -> list[str]:
        """Open the store if needed, applying missing migrations; return the names of the
        migrations this call applied (empty when the schema was already current)."""

    async def applied_migrations(self) -> list[str]:
        """Names of every migration applied to the open store, in order."""


class Accounts(Protocol):
    """User and developer accounts, and money entering a user's balance."""

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


class Keys(Protocol):
    """Users' API keys and developers' service tokens (only their hashes are stored)."""

    async def create_key(
        self,
        *,
        user: str,
        server: str,
        key_hash: str,
        prefix: str,
        expires_at: float | None,
        spend_limit: int | None,
        name: str | None = None,
    ) -> KeyRecord:
        """Raises NotFound for an unknown user, InvalidInput for a name ``rows.require_key_name`` refuses."""

    async def find_key(self, key_hash: str) -> KeyRecord | None: ...

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        """Raises NotFound, or InvalidInput when a prefix matches several keys."""

    async def revoked_since(self, since: float) -> list[str]:
        """Ids of keys revoked at or after ``since`` (for cache invalidation)."""

    async def touch_keys(self, last_used: Mapping[str, float]) -> None:
        """Record when keys last authenticated a call (key id -> unix seconds), in one write: a key's
        ``last_used_at`` only moves forward (an older time never overwrites a newer one, whichever
        process flushes last); unknown ids are ignored. Called with what a process gathered in memory
        (``proxy.auth.Authenticator``), at most every few seconds, never once per call."""

    async def create_service_token(
        self, *, developer: str, servers: Sequence[str], token_hash: str, prefix: str
    ) -> ServiceToken:
        """Raises NotFound for an unknown developer."""

    async def find_service_token(self, token_hash: str) -> ServiceToken | None: ...

    async def list_service_tokens(self, developer: str | None = None) -> list[ServiceToken]: ...

    async def revoke_service_token(self, id_or_prefix: str) -> ServiceToken:
        """Raises NotFound, or InvalidInput when a prefix matches several tokens."""


class Holds(Protocol):
    """The hot path: two-phase money movement of proxied calls (hold, then capture or void), leases."""

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


class Allowances(Protocol):
    """Free allowances: the first N priced calls of each UTC day cost 0 (the price table's
    ``free_calls_per_day``). Counted in the database, so replicas sharing it agree exactly."""

    async def claim_free_call(self, call: FreeCall) -> bool:
        """In one transaction, guarded by the database: record ``call`` as free if fewer than
        ``call.limit`` calls are recorded for its (user, server, scope, day), pending or used. True
        when the call is free (nothing is held for it then)."""

    async def settle_free_call(self, call_id: str, *, used: bool) -> None:
        """A free call ended: ``used`` (its success was delivered) keeps it counted; otherwise it is
        given back (a later call of the day is free instead). Idempotent."""

    async def free_calls_used(self, user: str, server: str, scope: str, day: str) -> int:
        """How many free calls (pending or used) are recorded for that allowance and day."""


class Charges(Protocol):
    """One-step charges and refunds (the service API), and reading charges back."""

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
        servers: Sequence[str] | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> list[Charge]:
        """Newest first; ``before`` is the id of the last charge of the previous page (cursor);
        ``servers`` keeps only charges on those servers (a service token's scope)."""


class Payouts(Protocol):
    """Developers' earnings on their way out."""

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


class Clawbacks(Protocol):
    """Money a payment provider took back from a user (a refund of a top-up, a lost dispute)."""

    async def clawback(self, user: str, amount: int, reference: str) -> Transfer:
        """Move ``amount`` from the user to the world account (transfer kind ``clawback``) even when
        that leaves the user's balance below zero or below what it holds: the money already left at the
        provider. A user whose available balance is negative is refused every hold (``hold`` needs
        ``balance - held >= amount``) until top-ups cover the debt; captures of holds taken before still
        stand. ``reference`` is required and idempotent like ``topup``'s: a repeat returns the original
        transfer with ``replayed=True``, the same reference for another user/amount raises
        IdempotencyConflict. Its reverse (a dispute won) is a ``topup`` with its own reference.
        Raises NotFound, InvalidInput (amount <= 0, empty reference), AmountTooLarge,
        BalanceLimitExceeded (the user's balance would pass -MAX_BALANCE; nothing written)."""

    async def reverse_payout(self, payout_id: str) -> Transfer:
        """A settled payout's money came back (the provider reversed its transfer): world -> the
        developer, the whole payout, transfer kind ``payout_reversal`` with the payout id as its
        reference (at most one per payout: a repeat returns it with ``replayed=True``). The payout
        stays ``settled`` (its reference names the reversed transfer). Raises NotFound, Conflict
        unless the payout is settled."""


class Reports(Protocol):
    """Read-only views: a user's summary, usage, a developer's earnings and statement."""

    async def user_summary(self, user: str, recent: int = 10) -> UserSummary: ...

    async def usage(self, user: str | None = None, server: str | None = None) -> list[UsageRow]: ...

    async def earnings(self, developer: str) -> Earnings: ...

    async def statement(self, developer: str, *, limit: int = 100, before: str | None = None) -> list[StatementLine]:
        """Movements of a developer's earnings, newest first, paginated by transfer id cursor."""

    async def earnings_breakdown(self, developer: str) -> list[EarningsBreakdown]:
        """Per server and per name (tool/feature) totals."""


class Audit(Protocol):
    """Checking every invariant, and moving a whole ledger between stores."""

    async def verify(self) -> list[str]:
        """Check every invariant on one consistent snapshot; return human-readable violations
        (empty list = clean)."""

    async def export_rows(self) -> list[ExportRow]:
        """Every row of every table (``EXPORT_TABLES`` order, exact values, ``EXPORT_COLUMNS``
        shape), read from one consistent snapshot."""

    async def import_rows(self, rows: Iterable[ExportRow]) -> dict[str, int]:
        """Load an export into this store, which must be empty (no user, developer or transfer;
        Conflict otherwise), in one transaction, keeping every id; returns rows per table.
        Raises InvalidInput for rows that do not fit (nothing is written then)."""


class Grants(Protocol):
    """Credit grants (``gateway.ledger.grants``): one hold of several calls' worth that a process
    spends in memory and settles in batches. A grant is a hold row, so ``Holds.renew`` and
    ``Holds.sweep`` keep its lease; these operations move its amount."""

    async def grant(self, req: GrantRequest) -> GrantState:
        """Open a grant (a new id) or top one up (a pending grant's id), in one transaction guarded
        like a hold: reserve ``min(want, available // share, key's remaining cap // share)``, or
        nothing when that is below ``least`` (TOO_LOW) or the key is revoked or expired (REVOKED).
        CLOSED when the id names a grant that is no longer pending. Raises NotFound for an unknown
        user, developer or key, InvalidInput for a key of another user or a bad amount,
        IdempotencyConflict when the id names a hold that is not a grant of this key."""

    async def flush_grant(self, grant_id: str, calls: Sequence[GrantedCall], *, release: int | None = 0) -> GrantFlush:
        """In one durable transaction: charge each call (its own captured hold row, charge transfer,
        postings and charge row, as a capture writes them) out of the grant, skipping call ids charged
        already; then give back ``release`` more of the grant (None: all that is left). A grant left
        with nothing is voided. A call the grant no longer covers (it lapsed and was swept) is charged
        only if the user's available balance and the key's cap still allow it (guarded as a hold), and
        is otherwise reported ``unbilled``: never an overdraft. Raises NotFound for an unknown grant."""

    async def refresh_grants(self, grant_ids: Sequence[str], lease_s: float) -> dict[str, GrantState]:
        """Renew the leases of these pending grants to now + lease_s and report each one's state
        (the user's available balance, the key's remaining cap, whether the key is revoked)."""

    async def grants_outstanding(self, user: str, key_id: str | None = None) -> int:
        """What pending grants of ``user`` (of one key, when given) reserve now, across processes."""


class Billable(Holds, Allowances, Grants, Protocol):
    """What proxied calls' billing uses: holds, free allowances and credit grants."""


class Ledger(Store, Accounts, Keys, Holds, Allowances, Grants, Charges, Payouts, Clawbacks, Reports, Audit, Protocol):
    """Everything a store provides: what the CLI's ledger commands and the app's wiring hold."""
