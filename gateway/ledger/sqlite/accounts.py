"""The SQLite ledger's ``Accounts`` concern: users and developers, and top-ups."""

from __future__ import annotations

import uuid

from gateway.errors import AlreadyExists, IdempotencyConflict
from gateway.ledger.base import Account, AccountKind, Transfer
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_name as _require_name
from gateway.ledger.sqlite.common import Conn
from gateway.ledger.sqlite.store import SqliteStore


class SqliteAccounts(SqliteStore):
    """User and developer accounts, and money entering a user's balance."""

    async def create_user(self, name: str) -> Account:
        return await self._create_account(AccountKind.USER, name)

    async def create_developer(self, name: str) -> Account:
        return await self._create_account(AccountKind.DEVELOPER, name)

    async def _create_account(self, kind: AccountKind, name: str) -> Account:
        _require_name(name, f"{kind.value} name")

        def tx(conn: Conn) -> Account:
            inserted = conn.execute(
                "INSERT INTO accounts (kind, name, created_at) VALUES (?, ?, ?) ON CONFLICT (kind, name) DO NOTHING",
                (kind.value, name, self._clock()),
            ).rowcount
            if inserted != 1:
                raise AlreadyExists(f"{kind.value} {name!r} already exists")
            return self._account_row(conn, kind, name)

        return await self._write(tx)

    async def get_account(self, kind: AccountKind, name: str) -> Account:
        return await self._read(lambda conn: self._account_row(conn, kind, name))

    async def developer_names(self) -> set[str]:
        def tx(conn: Conn) -> set[str]:
            rows = conn.execute("SELECT name FROM accounts WHERE kind = 'developer'").fetchall()
            return {row[0] for row in rows}

        return await self._read(tx)

    async def topup(self, user: str, amount: int, reference: str | None = None) -> Transfer:
        _require_amount(amount)

        def tx(conn: Conn) -> Transfer:
            user_id = self._account_id(conn, AccountKind.USER, user)
            if reference is not None:
                row = conn.execute(
                    "SELECT id, amount, account_id, created_at FROM transfers WHERE kind = 'topup' AND reference = ?",
                    (reference,),
                ).fetchone()
                if row is not None:
                    if row[1] != amount or row[2] != user_id:
                        raise IdempotencyConflict(
                            f"top-up reference {reference!r} was already used for a different user or amount"
                        )
                    return Transfer(row[0], "topup", row[1], reference, row[3], replayed=True)
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            conn.execute(
                "INSERT INTO transfers (id, kind, amount, reference, account_id, created_at) "
                "VALUES (?, 'topup', ?, ?, ?, ?)",
                (transfer_id, amount, reference, user_id, now),
            )
            self._post(conn, transfer_id, [(self._system[AccountKind.WORLD], -amount), (user_id, amount)])
            return Transfer(transfer_id, "topup", amount, reference, now)

        return await self._write(tx)
