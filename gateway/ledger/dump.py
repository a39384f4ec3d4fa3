"""The ledger dump: a store-neutral JSON-lines file (``agentpay ledger export`` / ``import``).

Line 1 is a header, then one line per row in ``EXPORT_TABLES`` order, then a trailer with the row
count of every table (a truncated file is refused)::

    {"format": "agentpay-ledger", "version": 2, "source": "sqlite", "tables": ["accounts", ...]}
    {"table": "accounts", "row": {"id": 1, "kind": "world", ...}}
    ...
    {"end": true, "counts": {"accounts": 5, ...}}

Values are exact: integers stay integers (millicents, account ids) and times are JSON floats,
which Python writes with the shortest repr that reads back as the same double.

Version 2 stores refund references namespaced by actor ("admin:<key>", "dev:<developer>:<key>",
migration 0006). A version 1 dump (written before) is still read: its refund references are moved
into their namespaces by the migration's rule (``base.namespaced_legacy_refund_reference``).

Version 3 adds the keys' ``name`` and ``last_used_at`` (migration 0009); the keys of an older dump have
them NULL.

Version 4 adds, after the ledger's tables, the tables the concerns beside the ledger carry (logins,
OAuth clients and grants, payment-provider records: ``gateway.storage.carry``). This module knows them
only by the columns its caller passes (``carried``): the ledger knows nothing of those concerns. A dump
of an older version has none of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from gateway.errors import InvalidInput
from gateway.ledger.base import EXPORT_COLUMNS, EXPORT_TABLES, ExportRow, namespaced_legacy_refund_reference

FORMAT = "agentpay-ledger"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
_CARRIED_SINCE = 4  # the first version with the side concerns' tables
Columns = Sequence[tuple[str, str]]  # (name, type) as in ``EXPORT_COLUMNS``
# Columns a table gained in a version: the rows of an older dump have them NULL.
_ADDED_COLUMNS: dict[int, dict[str, tuple[str, ...]]] = {3: {"keys": ("name", "last_used_at")}}


def write_dump(
    rows: Iterable[ExportRow], out: IO[str], *, source: str, carried: Mapping[str, Columns] | None = None
) -> dict[str, int]:
    """Write ``rows`` (from ``Ledger.export_rows``, then the ``carried`` tables' rows in that order)
    to ``out``; returns rows per table."""
    tables = [*EXPORT_TABLES, *(carried or {})]
    counts = dict.fromkeys(tables, 0)
    header = {"format": FORMAT, "version": VERSION, "source": source, "tables": tables}
    out.write(json.dumps(header) + "\n")
    for table, row in rows:
        counts[table] += 1
        out.write(json.dumps({"table": table, "row": row}, ensure_ascii=False, allow_nan=False) + "\n")
    out.write(json.dumps({"end": True, "counts": counts}) + "\n")
    return counts


def read_dump(lines: Iterable[str], *, carried: Mapping[str, Columns] | None = None) -> Iterator[ExportRow]:
    """The rows of a dump, each checked by ``check_row`` (the ``carried`` tables by their columns);
    raises InvalidInput (naming the line) for anything that is not a complete dump of this format. A
    version 1 dump is read whole first (its refund references need the charges and accounts that
    follow them) and then namespaced."""
    carried = dict(carried or {})
    tables: list[str] = list(EXPORT_TABLES)
    counts = dict.fromkeys(tables, 0)
    position = 0  # index in ``tables`` of the table being read: tables come in order
    header_seen = ended = False
    number = 0
    legacy: list[ExportRow] | None = None  # the rows of a version 1 dump, held back until its end
    version = VERSION
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InvalidInput(f"line {number} of the dump is not JSON: {exc}") from None
        if not isinstance(item, dict):
            raise InvalidInput(f"line {number} of the dump is not a JSON object")
        if not header_seen:
            if item.get("format") != FORMAT:
                raise InvalidInput(
                    f"line {number}: not an AgentPay ledger dump (format {item.get('format')!r})",
                    hint="Create the file with `agentpay ledger export FILE`",
                )
            if item.get("version") not in READABLE_VERSIONS:
                raise InvalidInput(f"line {number}: dump version {item.get('version')!r} is not supported")
            version = item["version"]
            if version >= _CARRIED_SINCE:
                tables = [*EXPORT_TABLES, *carried]
                counts = dict.fromkeys(tables, 0)
            if version == 1:
                legacy = []
            header_seen = True
            continue
        if ended:
            raise InvalidInput(f"line {number}: data after the end of the dump")
        if item.get("end") is True:
            if item.get("counts") != counts:
                raise InvalidInput(f"line {number}: the dump says it has {item.get('counts')} rows but holds {counts}")
            ended = True
            continue
        table, row = item.get("table"), item.get("row")
        if table not in tables or not isinstance(row, dict):
            known = ", ".join(tables)
            raise InvalidInput(f"line {number}: expected {{'table': <one of {known}>, 'row': {{…}}}}")
        index = tables.index(table)
        if index < position:
            raise InvalidInput(f"line {number}: table {table} after {tables[position]}: tables are out of order")
        position = index
        counts[table] += 1
        checked = check_row(
            table, _with_added_columns(table, row, version), where=f"line {number}", columns=carried.get(table)
        )
        if legacy is None:
            yield table, checked
        else:
            legacy.append((table, checked))
    if not header_seen:
        raise InvalidInput("the dump is empty")
    if not ended:
        raise InvalidInput(f"the dump ends at line {number} without its end marker: it is truncated")
    if legacy is not None:
        yield from _namespaced_refund_references(legacy)


def _with_added_columns(table: str, row: dict[str, Any], version: int) -> dict[str, Any]:
    """``row`` of a dump of ``version`` with the columns its table gained since, NULL."""
    added = [c for since, tables in _ADDED_COLUMNS.items() if version < since for c in tables.get(table, ())]
    return {**dict.fromkeys(added), **row} if added else row


def _namespaced_refund_references(rows: list[ExportRow]) -> Iterator[ExportRow]:
    """The rows of a version 1 dump with each refund reference in its actor's namespace."""
    names = {row["id"]: row["name"] for table, row in rows if table == "accounts"}
    developers = {row["id"]: names.get(row["developer_account_id"]) for table, row in rows if table == "charges"}
    for table, row in rows:
        if table == "transfers" and row["kind"] == "refund" and row["reference"] is not None:
            developer = developers.get(row["charge_id"])
            if developer is not None:  # else the refund names no charge of the dump: the import refuses it
                row = {**row, "reference": namespaced_legacy_refund_reference(row["reference"], developer)}
        yield table, row


def check_row(table: str, row: dict[str, Any], *, where: str = "", columns: Columns | None = None) -> dict[str, Any]:
    """``row`` with exactly the columns of ``table`` (a ledger table, or ``columns`` given) and values
    of their neutral types (ints for floats' columns are widened). Raises InvalidInput."""
    columns = columns if columns is not None else EXPORT_COLUMNS.get(table)
    prefix = f"{where}: " if where else ""
    if columns is None:
        raise InvalidInput(f"{prefix}unknown table {table!r}")
    names = [name for name, _ in columns]
    if set(row) != set(names):
        missing = sorted(set(names) - set(row))
        extra = sorted(set(row) - set(names))
        raise InvalidInput(f"{prefix}{table} row has missing columns {missing} and unknown columns {extra}")
    out: dict[str, Any] = {}
    for name, kind in columns:
        value = row[name]
        if value is not None:
            value = _typed(value, kind)
            if value is None:
                raise InvalidInput(f"{prefix}{table}.{name} must be of type {kind}, got {row[name]!r}")
        out[name] = value
    return out


def _typed(value: Any, kind: str) -> Any:
    """``value`` as ``kind``, or None when it is not of that type."""
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        result = float(value)
        return result if math.isfinite(result) and result == value else None
    if kind == "text":
        return value if isinstance(value, str) else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "texts":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return list(value) if ok else None
    raise AssertionError(f"unknown column type {kind!r}")
