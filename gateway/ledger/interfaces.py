"""The ledger's interfaces, one per concern. Every store implements all of them (``Ledger``); each
caller is given only the concern it uses (billing gets ``Holds``, the service API ``Charges`` and
``Keys``, …), so what a module can do to money is visible in its signature.

All amounts are integers in millicents. Methods raise ``gateway.errors`` types.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from gateway.ledger.base import (
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
    KeyRecord,
    Payout,
    ServiceToken,
    StatementLine,
    Transfer,
    UsageRow,
    UserSummary,
)


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
    ) -> KeyRecord: ...

    async def find_key(self, key_hash: str) -> KeyRecord | None: ...

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]: ...

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        """Raises NotFound, or InvalidInput when a prefix matches several keys."""

    async def revoked_since(self, since: float) -> list[str]:
        """Ids of keys revoked at or after ``since`` (for cache invalidation)."""

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


class Ledger(Store, Accounts, Keys, Holds, Charges, Payouts, Reports, Audit, Protocol):
    """Everything a store provides: what the CLI's ledger commands and the app's wiring hold."""
