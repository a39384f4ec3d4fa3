"""The vocabulary of credit grants (``interfaces.Grants``): one hold of several calls' worth that a
gateway process spends in memory, call by call, and settles in batches.

A grant is stored as a hold row (``holds``) whose method is ``GRANT_METHOD``: it reserves its amount
of the user's available balance and of the key's cap exactly like a call's hold, its lease is renewed
and swept like one (a crashed process's grant is voided by the sweep), and ``ledger verify``'s
"held equals the sum of pending holds" covers it unchanged. Unlike a call's hold, its amount moves:
a top-up adds to it, a flush of captured calls and a release take from it; when nothing is left it
is voided (its row keeps the last positive amount: holds' amounts are positive, and a voided hold
reserves nothing). Each call captured through a grant gets its own hold row (already captured), its
charge transfer, postings and charge row, exactly as a call captured through its own hold: receipts,
refunds, statements and ``verify`` cannot tell them apart. A call id is charged at most once: a
flush that is retried skips the calls already written.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.errors import InvalidInput
from gateway.ledger.base import charge_id_for
from gateway.ledger.rows import require_amount

GRANT_METHOD = "grant"  # holds.method of a grant row (calls' methods are tools/call, resources/read, …)
GRANT_ID_PREFIX = "gr_"  # grant ids are "gr_" + a time-ordered id


class GrantStatus(enum.StrEnum):
    OK = "ok"  # the grant holds ``amount`` (a top-up reserved ``granted`` more)
    TOO_LOW = "too_low"  # less than the least asked for fits in the balance or the key's cap: nothing reserved
    REVOKED = "revoked"  # the key is revoked or expired: nothing reserved
    CLOSED = "closed"  # the grant row is no longer pending (released to nothing, or swept): open a new one


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """Open a grant (a new ``grant_id``) or top it up (the id of a pending grant of the same key)."""

    grant_id: str
    key_id: str
    user: str
    developer: str
    server: str
    want: int  # the most to reserve, millicents
    least: int  # reserve nothing when less than this fits
    share: int  # reserve at most 1/share of the user's available balance and of the key's remaining cap
    lease_s: float
    owner: str  # the gateway process holding the lease


@dataclass(frozen=True, slots=True)
class GrantState:
    """A grant as the database sees it after an operation."""

    status: GrantStatus
    amount: int  # what the grant row reserves now (0 when closed)
    available: int  # the user's available balance (balance - held) now
    spend_remaining: int | None  # the key's remaining cap now (None: no cap)
    granted: int = 0  # reserved by this operation (a top-up)

    @property
    def open(self) -> bool:
        return self.status in (GrantStatus.OK, GrantStatus.TOO_LOW) and self.amount > 0


@dataclass(frozen=True, slots=True)
class GrantedCall:
    """A call held in memory against a grant and captured: what its charge records."""

    call_id: str
    developer: str
    server: str
    method: str
    name: str
    held: int  # what the call reserved of the grant (its price), millicents
    amount: int  # what is captured, 0 < amount <= held
    fee: int  # the platform fee part of ``held`` (the charge's fee is fee * amount // held)


@dataclass(frozen=True, slots=True)
class GrantFlush:
    """What one flush (``Grants.flush_grant``) wrote."""

    state: GrantState
    captured: int  # calls charged now
    replayed: int  # calls found charged already (a retried flush)
    unbilled: tuple[str, ...] = field(default=())  # calls that could not be charged (the grant had lapsed)


# --- what both stores compute the same way ------------------------------------------------------
def check_grant_request(req: GrantRequest) -> None:
    """InvalidInput for a request no store should run."""
    require_amount(req.want, "grant")
    require_amount(req.least, "least grant")
    if req.share < 1:
        raise InvalidInput(f"a grant's share must be at least 1, got {req.share}")
    if not req.lease_s > 0:
        raise InvalidInput(f"lease must be positive, got {req.lease_s!r}")
    if not req.grant_id:
        raise InvalidInput("a grant needs an id")


def check_flush(calls: Sequence[GrantedCall], release: int | None) -> None:
    """InvalidInput for a call whose amounts do not fit, or a negative release."""
    for call in calls:
        require_amount(call.held, "held amount")
        require_amount(call.amount, "capture amount")
        if call.amount > call.held:
            raise InvalidInput(f"call {call.call_id!r}: cannot capture {call.amount}, more than held {call.held}")
        if not 0 <= call.fee <= call.held:
            raise InvalidInput(f"call {call.call_id!r}: fee must be between 0 and {call.held}, got {call.fee}")
    if release is not None and release < 0:
        raise InvalidInput(f"release must not be negative, got {release}")


def grant_size(req: GrantRequest, available: int, remaining_cap: int | None) -> int:
    """What a grant request may reserve: at most ``want``, 1/share of the available balance and of
    the key's remaining cap; 0 when that is below ``least``."""
    size = min(req.want, available // req.share)
    if remaining_cap is not None:
        size = min(size, remaining_cap // req.share)
    return size if size >= req.least else 0


@dataclass(slots=True)
class FlushPlan:
    """A flush decided in Python, in call order, from what the transaction read (both stores)."""

    charged: list[tuple[GrantedCall, int, str, int]]  # (call, fee, charge id, the user's available after)
    replayed: int
    unbilled: list[str]
    left: int  # what the grant reserves afterwards (0: void it)
    from_grant: int  # captured out of the grant
    given_back: int  # released unused
    total: int  # captured in all
    available: int  # the user's available balance afterwards
    cap: int | None  # the key's remaining cap afterwards


def plan_flush(
    calls: Sequence[GrantedCall],
    done: set[str],
    *,
    pending: bool,
    amount: int,
    available: int,
    cap: int | None,
    release: int | None,
) -> FlushPlan:
    """Charge each call not in ``done`` out of the grant (``amount`` when ``pending``); a call the
    grant does not cover is charged only when the available balance and the key's cap allow it
    (a guarded one-step charge), and is unbilled otherwise; then give back ``release``."""
    left = amount if pending else 0
    plan = FlushPlan([], 0, [], 0, 0, 0, 0, available, cap)
    seen = set(done)
    for call in calls:
        if call.call_id in seen:
            plan.replayed += 1
            continue
        take = call.amount
        if take <= left:
            left -= take
            plan.from_grant += take
        elif plan.available >= take and (plan.cap is None or plan.cap >= take):
            plan.available -= take
            if plan.cap is not None:
                plan.cap -= take
        else:
            plan.unbilled.append(call.call_id)
            continue
        seen.add(call.call_id)
        plan.total += take
        plan.charged.append((call, call.fee * take // call.held, charge_id_for(call.call_id), plan.available))
    plan.given_back = left if release is None else min(release, left)
    plan.left = left - plan.given_back
    plan.available += plan.given_back
    if plan.cap is not None:
        plan.cap += plan.given_back
    return plan
