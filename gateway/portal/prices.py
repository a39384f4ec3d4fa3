"""The one place the portal reads a price from the live price table (``Runtime.prices.table``, which a
hot reload swaps at once). Every page that shows a price goes through ``price_of``: a flat price, or a
rule (by argument, per unit, metered by the upstream, a free allowance) described in words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from gateway.billing.pricing import Kind, PriceTable
from gateway.billing.rules import PriceRule
from gateway.money import format_cents


@dataclass(frozen=True, slots=True)
class Price:
    cents: str  # the least one call costs, exact ("0.25"): what data-cents carries
    text: str  # what a reader sees ("0.25¢ per call", "free", "from 2¢: …")

    @property
    def free(self) -> bool:
        return self.cents == "0" and self.text == "free"


def price_of(table: PriceTable, server: str, kind: str, name: str) -> Price:
    """The price of one call of ``name`` (a tool, a resource URI or template, a prompt) on ``server``."""
    found = table.price_of(server, cast(Kind, kind), name)
    return _flat(found) if isinstance(found, int) else _rule(found)


def _flat(millis: int) -> Price:
    cents = format_cents(millis)
    return Price(cents, "free" if millis == 0 else f"{cents}¢ per call")


def _rule(rule: PriceRule) -> Price:
    parts: list[str] = []
    if rule.metered:
        parts.append(f"metered by the server, at most {format_cents(rule.max)}¢ a call")
        parts.append(f"{format_cents(rule.price)}¢ when it reports nothing")
    else:
        parts.append(f"{format_cents(rule.price)}¢ per call")
        for each in rule.by_argument:
            when = ", ".join(f"{arg} = {value!r}" for arg, value in each.when)
            parts.append(f"{format_cents(each.price)}¢ when {when}")
        if rule.per_unit is not None:
            unit = rule.per_unit
            parts.append(f"plus {format_cents(unit.price)}¢ per unit of {unit.argument} (at most {unit.max_units})")
    if rule.free_calls_per_day is not None:
        parts.append(f"the first {rule.free_calls_per_day} calls a day free")
    return Price(format_cents(rule.least), "; ".join(parts))


def listed_prices(table: PriceTable, server: str) -> list[tuple[str, str, Price]]:
    """What the price file writes for ``server`` (names and globs), for a server whose upstream cannot
    be listed: (kind, name or pattern, price)."""
    out: list[tuple[str, str, Price]] = [
        (kind, name, price_of(table, server, kind, name))
        for kind, names in table.listed(server).items()
        for name in names
    ]
    out.append(("default", "anything else", _flat(table.default(server))))
    return out
