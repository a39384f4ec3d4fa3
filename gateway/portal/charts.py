"""Per-day figures and the geometry of the portal's bar charts (inline SVG drawn by the templates).

The figures are sums of the ledger's own records in integer millicents, per UTC day; every bar
carries its exact amount (``format_cents``) for its ``<title>`` and the table beside the chart."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from gateway.ledger.base import Charge
from gateway.ledger.interfaces import Charges
from gateway.money import format_cents

DAYS = 30
_PAGE = 500
WIDTH = 600
HEIGHT = 160
_AXIS = 20  # room under the bars for the first and last date


@dataclass(frozen=True, slots=True)
class Day:
    day: date
    millis: int
    calls: int

    @property
    def cents(self) -> str:
        return format_cents(self.millis)


@dataclass(frozen=True, slots=True)
class Bar:
    x: int
    y: int
    width: int
    height: int
    day: Day


@dataclass(frozen=True, slots=True)
class Chart:
    days: tuple[Day, ...]
    bars: tuple[Bar, ...]
    width: int = WIDTH
    height: int = HEIGHT
    axis: int = _AXIS

    @property
    def total_millis(self) -> int:
        return sum(d.millis for d in self.days)

    @property
    def total_cents(self) -> str:
        return format_cents(self.total_millis)

    @property
    def peak_cents(self) -> str:
        return format_cents(max((d.millis for d in self.days), default=0))


def utc_day(ts: float) -> date:
    return datetime.fromtimestamp(ts, UTC).date()


def first_day(now: float, days: int = DAYS) -> date:
    return utc_day(now) - timedelta(days=days - 1)


async def charges_since(
    ledger: Charges, since: date, *, user: str | None = None, developer: str | None = None
) -> list[Charge]:
    """Every charge of ``user`` (or ``developer``) made on or after the UTC day ``since``, newest first,
    read page by page through the ledger's own ``list_charges``."""
    cutoff = datetime.combine(since, datetime.min.time(), UTC).timestamp()
    out: list[Charge] = []
    before: str | None = None
    while True:
        page = await ledger.list_charges(user=user, developer=developer, limit=_PAGE, before=before)
        for charge in page:
            if charge.created_at < cutoff:
                return out
            out.append(charge)
        if len(page) < _PAGE:
            return out
        before = page[-1].id


def per_day(charges: Iterable[Charge], now: float, value: Callable[[Charge], int], days: int = DAYS) -> list[Day]:
    """``value`` of the charges summed per UTC day, for the ``days`` days up to today (oldest first)."""
    start = first_day(now, days)
    sums = [0] * days
    calls = [0] * days
    for charge in charges:
        index = (utc_day(charge.created_at) - start).days
        if 0 <= index < days:
            sums[index] += value(charge)
            calls[index] += 1
    return [Day(start + timedelta(days=i), sums[i], calls[i]) for i in range(days)]


def bar_chart(days: Sequence[Day]) -> Chart:
    """Bars scaled to the largest day (integer arithmetic); an empty day is a bar of height 0."""
    peak = max((d.millis for d in days), default=0)
    plot = HEIGHT - _AXIS
    slot = WIDTH // max(len(days), 1)
    bars = []
    for i, day in enumerate(days):
        height = 0 if peak <= 0 or day.millis <= 0 else max(1, day.millis * plot // peak)
        bars.append(Bar(x=i * slot + 1, y=plot - height, width=max(slot - 2, 1), height=height, day=day))
    return Chart(days=tuple(days), bars=tuple(bars))
