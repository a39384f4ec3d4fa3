"""Named migrations of a side concern, recorded beside the ledger's own in ``schema_migrations``.

A concern's migrations are ``(name, SQL script)`` pairs whose names start with the concern and
``_`` (``logins_0001_initial``), so they never collide with the ledger's (``0001_initial``) or
another concern's. Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Migration = tuple[str, str]

_CONCERN_RE = re.compile(r"^[a-z][a-z0-9]{1,30}$")

# The ledger's table, created the same way when a side store opens a database first.
SQLITE_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       TEXT PRIMARY KEY,
    applied_at REAL NOT NULL
)
"""
POSTGRES_SCHEMA_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       TEXT COLLATE "C" PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL
)
"""


def check_migrations(concern: str, migrations: Sequence[Migration]) -> None:
    """ValueError unless every name is ``<concern>_<4 digits>_<words>``, numbered in order."""
    if not _CONCERN_RE.match(concern):
        raise ValueError(f"concern name {concern!r} must be 2-31 lower-case letters or digits")
    for number, (name, _) in enumerate(migrations, start=1):
        if not re.fullmatch(rf"{concern}_{number:04d}_[a-z0-9_]+", name):
            raise ValueError(f"migration {name!r} must be named {concern}_{number:04d}_<what it does>")
