"""Row → dataclass mappers and argument checks shared by the SQLite and PostgreSQL stores
(both select the same columns in the same order)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import AmountTooLarge, BalanceLimitExceeded, InvalidInput
from gateway.ledger.base import (
    KEY_NAME_MAX,
    MAX_AMOUNT,
    MAX_BALANCE,
    Charge,
    HoldInfo,
    HoldRequest,
    HoldState,
    KeyRecord,
    Payout,
    PayoutState,
)
from gateway.money import format_cents


def require_amount(value: object, what: str = "amount") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} must be an integer number of millicents, got {value!r}")
    if value <= 0:
        raise InvalidInput(f"{what} must be positive, got {value}")
    if value > MAX_AMOUNT:
        raise amount_too_large(value, what)
    return value


def amount_too_large(value: int, what: str = "amount") -> AmountTooLarge:
    return AmountTooLarge(
        f"{what} {format_cents(value)} cents is over the most one request may move ({format_cents(MAX_AMOUNT)} cents)"
    )


def within_balance_limit(balance: int) -> bool:
    """Whether ``balance`` (of any account: the world's is the only one below zero) is one the ledger keeps."""
    return -MAX_BALANCE <= balance <= MAX_BALANCE


def balance_limit_error(kind: str, name: str, balance: int, change: int) -> BalanceLimitExceeded:
    """The refusal of a leg of ``change`` on an account holding ``balance`` that would leave the range."""
    after = balance + change
    if kind == "world":
        what = (
            f"the world account (money that entered the ledger) would reach {format_cents(after)} cents: "
            f"the ledger as a whole holds at most {format_cents(MAX_BALANCE)} cents"
        )
    else:
        what = (
            f"the {kind} account {name!r} would hold {format_cents(after)} cents, "
            f"over the most any account may hold ({format_cents(MAX_BALANCE)} cents)"
        )
    return BalanceLimitExceeded(f"Refused: {what}")


def require_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{what} must be a non-empty name")
    return value


def require_key_name(value: object) -> str | None:
    """A key's name as given (None: no name): 1 to ``KEY_NAME_MAX`` printable characters. Control
    characters, line breaks and invisible format characters (a right-to-left override, a zero-width
    space) are refused: a name is shown on the keys list and in the CLI's output as it is."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"a key name must be text, got {type(value).__name__}")
    if not value:
        raise InvalidInput("a key name must not be empty", hint="Leave the name out for a key without one")
    if len(value) > KEY_NAME_MAX:
        raise InvalidInput(
            f"a key name is at most {KEY_NAME_MAX} characters, got {len(value)}", hint="Give a shorter name"
        )
    if not value.isprintable():
        raise InvalidInput(
            "a key name may hold only printable characters (no control characters or line breaks)",
            hint="Give a name of letters, digits, spaces and punctuation",
        )
    return value


def require_key_times(last_used: Mapping[str, float]) -> list[tuple[str, float]]:
    """``touch_keys``'s argument as (key id, unix seconds) pairs sorted by id: the order in which both
    stores lock the keys rows (as the batched holds do), so two processes flushing at once cannot deadlock."""
    pairs = []
    for key_id, when in last_used.items():
        if not isinstance(key_id, str) or not key_id:
            raise InvalidInput(f"a key id must be a non-empty string, got {key_id!r}")
        if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
            raise InvalidInput(f"the last use of key {key_id} must be unix seconds, got {when!r}")
        pairs.append((key_id, float(when)))
    return sorted(pairs)


def require_limit(limit: object) -> None:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InvalidInput(f"limit must be a positive integer, got {limit!r}")


def key_record(row: Sequence[Any]) -> KeyRecord:
    return KeyRecord(
        id=row[0],
        user=row[1],
        server=row[2],
        prefix=row[3],
        created_at=row[4],
        expires_at=row[5],
        revoked_at=row[6],
        spend_limit=row[7],
        spent=row[8],
        held=row[9],
        name=row[10],
        last_used_at=row[11],
    )


def charge(row: Sequence[Any]) -> Charge:
    return Charge(
        id=row[0],
        call_id=row[1],
        user=row[2],
        developer=row[3],
        server=row[4],
        method=row[5],
        name=row[6],
        amount=row[7],
        fee=row[8],
        refunded=row[9],
        created_at=row[10],
        balance_after=row[11],
    )


def hold_info(row: Sequence[Any]) -> HoldInfo:
    return HoldInfo(
        call_id=row[0],
        user=row[1],
        developer=row[2],
        server=row[3],
        method=row[4],
        name=row[5],
        amount=row[6],
        fee=row[7],
        state=HoldState(row[8]),
        created_at=row[9],
        expires_at=row[10],
        charge_id=row[11],
    )


def payout(row: Sequence[Any]) -> Payout:
    return Payout(
        id=row[0],
        developer=row[1],
        amount=row[2],
        state=PayoutState(row[3]),
        reference=row[4],
        created_at=row[5],
        completed_at=row[6],
    )


HOLD_INSERT_COLUMNS = (
    "call_id, key_id, user_account_id, developer_account_id, server, method, name, amount, fee, owner, "
    "created_at, lease_expires_at"
)


def hold_row(req: HoldRequest, user_id: int, developer_id: int, now: float) -> tuple[Any, ...]:
    """The values of a new hold row, in ``HOLD_INSERT_COLUMNS`` order (both stores)."""
    return (
        req.call_id,
        req.key_id,
        user_id,
        developer_id,
        req.server,
        req.method,
        req.name,
        req.amount,
        req.fee,
        req.owner,
        now,
        now + req.lease_s,
    )
