"""Price rules beyond a flat price: by argument, per unit, metered by the upstream, free allowances.

A flat price stays a plain ``int`` of millicents in the table (the hot path compares it and holds
it). Anything else is one frozen :class:`PriceRule`, which turns a request's arguments into a
:class:`Quote`: what is held before forwarding and what a success costs.

    summarize:
      price: 2                  # base price
      by_argument:              # the first rule whose `when` all match sets the base instead
        - when: {model: "large"}
          price: 10
      per_unit:                 # added: unit price times the integer value of one argument
        argument: pages
        price: 0.5
        max_units: 200
    translate:
      metered: true             # the upstream reports the cost in result._meta["io.agentpay/charge"]
      max: 50                   # held before forwarding; a report above it is capped
      price: 5                  # charged for a success that carries no report (or a malformed one)
      free_calls_per_day: 3

Pure: the standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from gateway.money import AmountError, format_cents, parse_cents

__all__ = ["ArgumentRule", "BadUnits", "PerUnit", "PriceRule", "Quote", "parse_report", "same_value"]

Scalar = str | int | float | bool
CHARGE_META = "io.agentpay/charge"  # where a metered upstream reports the cost of one call
_MAX_DIGITS = 18  # a prompt argument is a string: at most this many decimal digits count as units


def same_value(got: object, want: Scalar) -> bool:
    """JSON equality of an argument and a `when` value: a boolean is never a number (``true`` is not
    ``1``), a number equals a number of the same value (``2`` and ``2.0``), a string a string."""
    if isinstance(want, bool):
        return got is want
    if isinstance(want, str):
        return isinstance(got, str) and got == want
    return isinstance(got, int | float) and not isinstance(got, bool) and got == want


@dataclass(frozen=True, slots=True)
class ArgumentRule:
    """``when`` (argument name → value, all must be equal) sets the base price to ``price``."""

    when: tuple[tuple[str, Scalar], ...]
    price: int

    def matches(self, arguments: Mapping[str, Any]) -> bool:
        for name, want in self.when:  # noqa: SIM110  # a loop, not all(<generator>): on the request path
            if name not in arguments or not same_value(arguments[name], want):
                return False
        return True

    def describe(self) -> dict[str, Any]:
        return {"when": dict(self.when), "price_cents": format_cents(self.price)}


@dataclass(frozen=True, slots=True)
class PerUnit:
    """``price`` millicents per unit, the units being the integer value of ``argument``."""

    argument: str
    price: int
    max_units: int

    def describe(self) -> dict[str, Any]:
        return {"argument": self.argument, "price_cents": format_cents(self.price), "max_units": self.max_units}


class BadUnits(ValueError):
    """The unit argument of a per-unit price is missing, not a non-negative integer, or too large:
    the call is refused before forwarding (-32602) and charged nothing."""

    def __init__(self, message: str, argument: str) -> None:
        super().__init__(message)
        self.message = message
        self.argument = argument


class Quote(NamedTuple):
    """What one call is held for, and what its success costs when the upstream reports nothing.
    A tuple: made for every priced call, it must cost next to nothing (a frozen dataclass costs
    several times more to build)."""

    hold: int  # millicents reserved before forwarding: the most the call can cost
    price: int  # millicents a success costs (a metered call: when it carries no valid report)
    metered: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceRule:
    """A price that depends on the request, or is reported by the upstream, or has a free allowance."""

    price: int  # the base price (metered: the price of a success without a report)
    by_argument: tuple[ArgumentRule, ...] = ()
    per_unit: PerUnit | None = None
    metered: bool = False
    max: int = 0  # metered: the hold, and the cap of a report
    free_calls_per_day: int | None = None  # this name's own allowance (None: the server's applies)

    def quote(self, arguments: Mapping[str, Any], *, strings_count: bool = False) -> Quote:
        """The hold and the price for these arguments; raises BadUnits. ``strings_count``: a
        string of decimal digits counts as units (prompt arguments are strings)."""
        base = self.price
        for rule in self.by_argument:
            if rule.matches(arguments):
                base = rule.price
                break
        if self.metered:
            return Quote(self.max, base, metered=True)
        per_unit = self.per_unit
        if per_unit is None:
            return Quote(base, base)
        amount = base + per_unit.price * self._units(per_unit, arguments, strings_count)
        return Quote(amount, amount)

    @staticmethod
    def _units(per_unit: PerUnit, arguments: Mapping[str, Any], strings_count: bool) -> int:
        name = per_unit.argument
        value = arguments.get(name)
        if strings_count and isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value) if len(value) <= _MAX_DIGITS else per_unit.max_units + 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            got = "missing" if name not in arguments else f"{value!r}"[:40]
            raise BadUnits(
                f"Argument {name!r} must be an integer of 0 or more (it sets the price of this call); got {got}",
                name,
            )
        if value > per_unit.max_units:
            raise BadUnits(
                f"Argument {name!r} is {value}; the most one call may ask for is {per_unit.max_units}",
                name,
            )
        return value

    @property
    def least(self) -> int:
        """The least one call can cost (0 for a metered call: its upstream may report 0)."""
        if self.metered:
            return 0
        return min((self.price, *(r.price for r in self.by_argument)))

    @property
    def most(self) -> int:
        """The most one call can cost: what is held at worst."""
        if self.metered:
            return self.max
        base = max((self.price, *(r.price for r in self.by_argument)))
        per_unit = self.per_unit
        return base + (per_unit.price * per_unit.max_units if per_unit is not None else 0)

    def describe(self) -> dict[str, Any]:
        """The rule for ``tools/list``'s ``_meta["io.agentpay/price"]``: machine-readable."""
        out: dict[str, Any] = {
            "from_cents": format_cents(self.least),
            "max_cents": format_cents(self.most),
            "price_cents": format_cents(self.price),
        }
        if self.by_argument:
            out["by_argument"] = [r.describe() for r in self.by_argument]
        if self.per_unit is not None:
            out["per_unit"] = self.per_unit.describe()
        if self.metered:
            out["metered"] = True
        if self.free_calls_per_day is not None:
            out["free_calls_per_day"] = self.free_calls_per_day
        return out


def parse_report(result: Any) -> tuple[int | None, str | None]:
    """A metered upstream's report in a result: (millicents, None), (None, None) when there is no
    report, or (None, why) when it is malformed. ``amount_cents`` is a decimal string or a JSON
    number with the price table's rules (at most 3 decimals, not negative)."""
    meta = result.get("_meta") if isinstance(result, dict) else None
    if not isinstance(meta, dict) or CHARGE_META not in meta:
        return None, None
    report = meta[CHARGE_META]
    if not isinstance(report, dict) or "amount_cents" not in report:
        return None, f'{CHARGE_META} must be an object with "amount_cents"'
    value = report["amount_cents"]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None, "amount_cents must be a decimal string or a number"
    try:
        return parse_cents(value if isinstance(value, str) else repr(value)), None
    except AmountError as exc:
        return None, str(exc)
