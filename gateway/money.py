"""Exact money amounts.

The internal unit is the *millicent* (1/1000 of a cent), always a Python ``int``.
Amounts enter the system as text ("5", "0.25", "94.5") and leave it as cents rendered
as a decimal string. Floats are refused everywhere: they cannot represent 0.1 exactly.
"""

from __future__ import annotations

import re
from decimal import Decimal

MILLIS_PER_CENT = 1000
MAX_MILLIS = 10**18  # fits a signed 64-bit column with room for sums
_MAX_TEXT = 40
# ASCII digits only: ``\d`` (and ``int()``) also take fullwidth, Arabic-Indic, Devanagari… digits.
_AMOUNT = re.compile(r"(?P<sign>-?)(?P<int>[0-9]+)(?:\.(?P<frac>[0-9]+))?")


class AmountError(ValueError):
    """An amount that is not a non-negative number of cents with at most 3 decimals."""


def parse_cents(value: object, *, allow_negative: bool = False) -> int:
    """Parse an amount of cents given as text, int or Decimal into millicents.

    >>> parse_cents("0.25")
    250
    >>> parse_cents(5)
    5000
    """
    if isinstance(value, (bool, float)):
        raise AmountError(f'amount {value!r} must be written as an exact decimal (e.g. "0.25"), not a float')
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise AmountError(f"amount {value!r} is not a finite number")
        text = format(value, "f")
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise AmountError(f"amount {value!r} must be a number of cents such as 5 or 0.25")
    if len(text) > _MAX_TEXT:
        raise AmountError(f"amount {text[:20]!r}… is too long to be an amount of cents")
    match = _AMOUNT.fullmatch(text)
    if match is None:
        if not text.isascii():
            raise AmountError(f"amount {text!r} must be written with ASCII digits 0-9, such as 5 or 0.25")
        raise AmountError(f"amount {text!r} is not a number of cents such as 5 or 0.25")
    frac = (match.group("frac") or "").rstrip("0") if match.group("frac") else ""
    if len(frac) > 3:
        raise AmountError(f"amount {text!r} has more than 3 decimal places (the smallest unit is 0.001 cent)")
    millis = int(match.group("int")) * MILLIS_PER_CENT + int(frac.ljust(3, "0") or "0")
    if millis > MAX_MILLIS:
        raise AmountError(f"amount {text!r} is larger than the largest supported amount ({MAX_MILLIS // 1000} cents)")
    if match.group("sign"):
        millis = -millis
    if millis < 0 and not allow_negative:
        raise AmountError(f"amount {text!r} must not be negative")
    return millis


def format_cents(millis: int) -> str:
    """Render millicents as a decimal string of cents: 94500 -> "94.5", 5000 -> "5"."""
    if not isinstance(millis, int) or isinstance(millis, bool):
        raise TypeError(f"millicents must be an int, got {type(millis).__name__}")
    sign = "-" if millis < 0 else ""
    whole, frac = divmod(abs(millis), MILLIS_PER_CENT)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:03d}".rstrip("0")


def fee_share(amount: int, fee_basis_points: int) -> int:
    """The platform's share of ``amount`` for a fee in basis points, rounded down."""
    return amount * fee_basis_points // 10_000
