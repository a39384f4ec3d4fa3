"""The PostgreSQL ledger's ``Accounts`` concern: user and developer accounts, and top-ups."""

from __future__ import annotations

import uuid

from gateway.errors import AlreadyExists, IdempotencyConflict
from gateway.ledger.base import Account, AccountKind, Transfer
from gateway.ledger.postgres.common import Conn
from gateway.ledger.postgres.store import PostgresStore
from gateway.ledger.rows import require_amount as _require_amount
from gateway.ledger.rows import require_name as _require_name


class PostgresAccounts(PostgresStore):
    """User and developer accounts, and money entering a user's balance."""

    async def create_user(self, name: str) -> Account:
        return await self._create_account(AccountKind.USER, name)

    async def create_developer(self, name: str) -> Account:
        return await self._create_account(AccountKind.DEVELOPER, name)

    async def _create_account(self, kind: AccountKind, name: str) -> Account:
        _require_name(name, f"{kind.value} name")

        async def tx(conn: Conn) -> Account:
            row = await conn.fetchrow(
                "INSERT INTO accounts (kind, name, created_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (kind, name) DO NOTHING RETURNING id, kind, name, balance, held",
                kind.value,
                name,
                self._clock(),
            )
            if row is None:
                raise AlreadyExists(f"{kind.value} {name!r} already exists")
            return Account(id=row[0], kind=AccountKind(row[1]), name=row[2], balance=row[3], held=row[4])

        return await self._run(tx, idempotent=False)

    async def get_account(self, kind: AccountKind, name: str) -> Account:
        return await self._read(lambda conn: self._account_row(conn, kind, name))

    async def developer_names(self) -> set[str]:
        async def tx(conn: Conn) -> set[str]:
            return {row[0] for row in await conn.fetch("SELECT name FROM accounts WHERE kind = 'developer'")}

        return await self._read(tx)

    async def topup(self, user: str, amount: int, reference: str | None = None) -> Transfer:
        _require_amount(amount)

        async def tx(conn: Conn) -> Transfer:
            user_id = await self._account_id(conn, AccountKind.USER, user)
            if reference is not None:
                row = await conn.fetchrow(
                    "SELECT id, amount, account_id, created_at FROM transfers WHERE kind = 'topup' AND reference = $1",
                    reference,
                )
                if row is not None:
                    if row[1] != amount or row[2] != user_id:
                        raise IdempotencyConflict(
                            f"top-up reference {reference!r} was already used for a different user or amount"
                        )
                    return Transfer(row[0], "topup", row[1], reference, row[3], replayed=True)
            world = self._system[AccountKind.WORLD]
            await self._lock_accounts(conn, [world, user_id])
            transfer_id = "tr_" + uuid.uuid4().hex
            now = self._clock()
            await self._insert_transfer(conn, transfer_id, "topup", amount, reference, user_id, None, now)
            await self._post(conn, transfer_id, [(world, -amount), (user_id, amount)])
            return Transfer(transfer_id, "topup", amount, reference, now)

        return await self._run(tx, idempotent=reference is not None)
