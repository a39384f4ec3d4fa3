"""CSV export of a user's charges: the ledger's own records, amounts as exact cent strings."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from gateway.api.operations import iso
from gateway.ledger.base import Charge
from gateway.ledger.interfaces import Charges
from gateway.money import format_cents

COLUMNS = ("id", "created_at", "server", "method", "name", "amount_cents", "refunded_cents")
_PAGE = 500
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


async def all_charges(ledger: Charges, user: str) -> list[Charge]:
    """Every charge of ``user``, newest first (the ledger's order), page by page."""
    out: list[Charge] = []
    before: str | None = None
    while True:
        page = await ledger.list_charges(user=user, limit=_PAGE, before=before)
        out.extend(page)
        if len(page) < _PAGE:
            return out
        before = page[-1].id


def _cell(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula (a tool name is chosen by whoever calls it)."""
    return "'" + text if text.startswith(_FORMULA) else text


def charges_csv(charges: Iterable[Charge]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for c in charges:
        writer.writerow(
            [
                c.id,
                iso(c.created_at),
                _cell(c.server),
                c.method,
                _cell(c.name),
                format_cents(c.amount),
                format_cents(c.refunded),
            ]
        )
    return out.getvalue()
