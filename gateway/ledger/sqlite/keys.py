"""The SQLite ledger's ``Keys`` concern: users' API keys and developers' service tokens."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import AlreadyExists, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, KeyRecord, ServiceToken
from gateway.ledger.rows import key_record as _key_record
from gateway.ledger.rows import require_key_name as _require_key_name
from gateway.ledger.rows import require_key_times as _require_key_times
from gateway.ledger.rows import require_name as _require_name
from gateway.ledger.sqlite.common import _KEY_COLUMNS, Conn
from gateway.ledger.sqlite.store import SqliteStore

_TOKEN_COLUMNS = """
    t.id, a.name, t.servers, t.prefix, t.created_at, t.revoked_at
    FROM service_tokens t JOIN accounts a ON a.id = t.developer_account_id
"""


def _service_token(row: Sequence[Any]) -> ServiceToken:
    return ServiceToken(
        id=row[0],
        developer=row[1],
        servers=tuple(json.loads(row[2])),
        prefix=row[3],
        created_at=row[4],
        revoked_at=row[5],
    )


def _resolve_id_or_prefix(conn: Conn, table: str, what: str, id_or_prefix: str) -> str:
    """The id of the one row of ``table`` (keys, service_tokens) whose id is ``id_or_prefix`` or
    whose id or display prefix starts with it. Raises NotFound, or InvalidInput when ambiguous."""
    row = conn.execute(f"SELECT id FROM {table} WHERE id = ?", (id_or_prefix,)).fetchone()
    if row is not None:
        return str(row[0])
    n = len(id_or_prefix)
    matches = [
        r[0]
        for r in conn.execute(
            f"SELECT id FROM {table} WHERE substr(prefix, 1, ?) = ? OR substr(id, 1, ?) = ? ORDER BY id",
            (n, id_or_prefix, n, id_or_prefix),
        ).fetchall()
    ]
    if not matches:
        raise NotFound(f"no {what} with id or prefix {id_or_prefix!r}")
    if len(matches) > 1:
        raise InvalidInput(
            f"{id_or_prefix!r} matches {len(matches)} {what}s ({', '.join(matches[:5])}"
            f"{', …' if len(matches) > 5 else ''})",
            hint=f"Give the {what} id or more characters of the prefix",
        )
    return str(matches[0])


class SqliteKeys(SqliteStore):
    """Users' API keys and developers' service tokens (only their hashes are stored)."""

    # --- keys -----------------------------------------------------------------------------------
    async def create_key(
        self,
        *,
        user: str,
        server: str,
        key_hash: str,
        prefix: str,
        expires_at: float | None,
        spend_limit: int | None,
        name: str | None = None,
    ) -> KeyRecord:
        _require_name(server, "server")
        _require_name(key_hash, "key hash")
        name = _require_key_name(name)
        if spend_limit is not None and (
            not isinstance(spend_limit, int) or isinstance(spend_limit, bool) or spend_limit < 0
        ):
            raise InvalidInput(f"spend limit must be a non-negative number of millicents, got {spend_limit!r}")

        def tx(conn: Conn) -> KeyRecord:
            user_id = self._account_id(conn, AccountKind.USER, user)
            if conn.execute("SELECT 1 FROM keys WHERE key_hash = ?", (key_hash,)).fetchone():
                raise AlreadyExists("a key with this secret already exists")
            key_id = "key_" + secrets.token_hex(6)
            conn.execute(
                "INSERT INTO keys (id, user_account_id, server, key_hash, prefix, created_at, "
                "expires_at, spend_limit, name) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key_id, user_id, server, key_hash, prefix, self._clock(), expires_at, spend_limit, name),
            )
            return self._key_by_id(conn, key_id)

        return await self._write(tx)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        def tx(conn: Conn) -> KeyRecord | None:
            row = conn.execute(f"SELECT {_KEY_COLUMNS} WHERE k.key_hash = ?", (key_hash,)).fetchone()
            return None if row is None else _key_record(row)

        return await self._read(tx)

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]:
        def tx(conn: Conn) -> list[KeyRecord]:
            if user is None:
                rows = conn.execute(f"SELECT {_KEY_COLUMNS} ORDER BY k.created_at, k.id").fetchall()
            else:
                user_id = self._account_id(conn, AccountKind.USER, user)
                rows = conn.execute(
                    f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = ? ORDER BY k.created_at, k.id",
                    (user_id,),
                ).fetchall()
            return [_key_record(row) for row in rows]

        return await self._read(tx)

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the key id or the start of its prefix")

        def tx(conn: Conn) -> KeyRecord:
            key_id = _resolve_id_or_prefix(conn, "keys", "key", id_or_prefix)
            conn.execute(
                "UPDATE keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (self._clock(), key_id),
            )
            return self._key_by_id(conn, key_id)

        return await self._write(tx)

    async def revoked_since(self, since: float) -> list[str]:
        def tx(conn: Conn) -> list[str]:
            rows = conn.execute(
                "SELECT id FROM keys WHERE revoked_at >= ? ORDER BY revoked_at, id", (since,)
            ).fetchall()
            return [row[0] for row in rows]

        return await self._read(tx)

    async def touch_keys(self, last_used: Mapping[str, float]) -> None:
        pairs = _require_key_times(last_used)
        if not pairs:
            return

        def tx(conn: Conn) -> None:
            # max(): a time older than the stored one (another process's late flush) changes nothing
            conn.executemany(
                "UPDATE keys SET last_used_at = max(coalesce(last_used_at, 0), ?) WHERE id = ?",
                [(when, key_id) for key_id, when in pairs],
            )

        await self._write(tx, durable=False)  # a crash loses at most a console's "last used", no money

    # --- service tokens -------------------------------------------------------------------------
    async def create_service_token(
        self, *, developer: str, servers: Sequence[str], token_hash: str, prefix: str
    ) -> ServiceToken:
        _require_name(token_hash, "token hash")
        _require_name(prefix, "token prefix")
        if isinstance(servers, str):
            raise InvalidInput("servers must be a list of server names, not one string")
        names = list(dict.fromkeys(_require_name(server, "server") for server in servers))
        if not names:
            raise InvalidInput("a service token needs at least one server")

        def tx(conn: Conn) -> ServiceToken:
            developer_id = self._account_id(conn, AccountKind.DEVELOPER, developer)
            if conn.execute("SELECT 1 FROM service_tokens WHERE token_hash = ?", (token_hash,)).fetchone():
                raise AlreadyExists("a service token with this secret already exists")
            token_id = "tok_" + secrets.token_hex(6)
            conn.execute(
                "INSERT INTO service_tokens (id, developer_account_id, servers, token_hash, prefix, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (token_id, developer_id, json.dumps(names), token_hash, prefix, self._clock()),
            )
            return self._token_by_id(conn, token_id)

        return await self._write(tx)

    @staticmethod
    def _token_by_id(conn: Conn, token_id: str) -> ServiceToken:
        row = conn.execute(f"SELECT {_TOKEN_COLUMNS} WHERE t.id = ?", (token_id,)).fetchone()
        if row is None:
            raise NotFound(f"no service token {token_id!r}")
        return _service_token(row)

    async def find_service_token(self, token_hash: str) -> ServiceToken | None:
        def tx(conn: Conn) -> ServiceToken | None:
            row = conn.execute(f"SELECT {_TOKEN_COLUMNS} WHERE t.token_hash = ?", (token_hash,)).fetchone()
            return None if row is None else _service_token(row)

        return await self._read(tx)

    async def list_service_tokens(self, developer: str | None = None) -> list[ServiceToken]:
        def tx(conn: Conn) -> list[ServiceToken]:
            developer_id = None if developer is None else self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = conn.execute(
                f"SELECT {_TOKEN_COLUMNS} WHERE ?1 IS NULL OR t.developer_account_id = ?1 ORDER BY t.created_at, t.id",
                (developer_id,),
            ).fetchall()
            return [_service_token(row) for row in rows]

        return await self._read(tx)

    async def revoke_service_token(self, id_or_prefix: str) -> ServiceToken:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the service token id or the start of its prefix")

        def tx(conn: Conn) -> ServiceToken:
            token_id = _resolve_id_or_prefix(conn, "service_tokens", "service token", id_or_prefix)
            conn.execute(
                "UPDATE service_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                (self._clock(), token_id),
            )
            return self._token_by_id(conn, token_id)

        return await self._write(tx)
