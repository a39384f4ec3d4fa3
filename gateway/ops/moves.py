"""Moving a gateway's data to another store: the concerns beside the ledger whose tables a dump
carries (``gateway.storage.carry``), and their part of ``agentpay ledger export`` / ``import``."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from gateway.errors import Conflict, GatewayError
from gateway.logins.carried import CARRIED as LOGINS
from gateway.oauth.carried import CARRIED as OAUTH
from gateway.payments.carried import CARRIED as PAYMENTS
from gateway.storage.carry import Carried, Row, export_rows, import_rows

CONCERNS: tuple[Carried, ...] = (LOGINS, OAUTH, PAYMENTS)  # in the order a dump holds them


def carried_columns() -> dict[str, tuple[tuple[str, str], ...]]:
    """Every carried table's columns, in dump order (what ``ledger.dump`` checks their rows by)."""
    return {t.name: tuple(t.columns) for c in CONCERNS for t in c.tables}


async def export_carried(database: str, applied: Collection[str]) -> list[Row]:
    """The carried rows of every concern whose tables exist (its first migration is in ``applied``:
    a database no portal, OAuth or Stripe ever opened is not given empty tables by an export)."""
    rows: list[Row] = []
    for concern in CONCERNS:
        if not any(name.startswith(f"{concern.concern}_") for name in applied):
            continue
        side = concern.open_side(database)
        await side.open()
        try:
            rows.extend(await export_rows(side, concern.tables))
        finally:
            await side.close()
    return rows


async def check_carried_empty(database: str) -> None:
    """Conflict when a carried table of the target already holds rows (checked before the ledger's
    import writes anything)."""
    for concern in CONCERNS:
        side = concern.open_side(database)
        await side.open()
        try:
            await import_rows(side, concern.tables, [], dry_run=True)
        finally:
            await side.close()


async def import_carried(database: str, rows: Sequence[Row]) -> dict[str, int]:
    """Write the carried rows, one transaction per concern, after the ledger's import committed."""
    counts: dict[str, int] = {}
    for concern in CONCERNS:
        names = {t.name for t in concern.tables}
        side = concern.open_side(database)
        await side.open()
        try:
            counts.update(await import_rows(side, concern.tables, [r for r in rows if r[0] in names]))
        except GatewayError as exc:
            raise Conflict(
                f"the ledger was imported but the {concern.concern} records were not: {exc.message}",
                hint="Drop the target database, create it empty and import the dump again",
            ) from exc
        finally:
            await side.close()
    return counts
