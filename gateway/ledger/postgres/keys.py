"""The PostgreSQL ledger's ``Keys`` concern: users' API keys and developers' service tokens (only their
hashes are stored).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from gateway.errors import AlreadyExists, InvalidInput, NotFound
from gateway.ledger.base import AccountKind, KeyRecord, ServiceToken
from gateway.ledger.postgres.common import _KEY_COLUMNS, Conn, Row
from gateway.ledger.postgres.store import PostgresStore
from gateway.ledger.rows import key_record as _key_record
from gateway.ledger.rows import require_key_name as _require_key_name
from gateway.ledger.rows import require_key_times as _require_key_times
from gateway.ledger.rows import require_name as _require_name

_TOKEN_COLUMNS = """
    t.id, a.name, t.servers, t.prefix, t.created_at, t.revoked_at
    FROM service_tokens t JOIN accounts a ON a.id = t.developer_account_id
"""


def _token(row: Row) -> ServiceToken:
    return ServiceToken(
        id=row[0], developer=row[1], servers=tuple(row[2]), prefix=row[3], created_at=row[4], revoked_at=row[5]
    )


class PostgresKeys(PostgresStore):
    """Users' API keys and developers' service tokens."""

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

        async def tx(conn: Conn) -> KeyRecord:
            user_id = await self._account_id(conn, AccountKind.USER, user)
            key_id = "key_" + secrets.token_hex(6)
            inserted = await conn.fetchval(
                "INSERT INTO keys (id, user_account_id, server, key_hash, prefix, created_at, expires_at, spend_limit, "
                "name) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (key_hash) DO NOTHING RETURNING id",
                key_id,
                user_id,
                server,
                key_hash,
                prefix,
                self._clock(),
                expires_at,
                spend_limit,
                name,
            )
            if inserted is None:
                raise AlreadyExists("a key with this secret already exists")
            return await self._key_by_id(conn, key_id)

        return await self._run(tx, idempotent=False)

    async def find_key(self, key_hash: str) -> KeyRecord | None:
        async def tx(conn: Conn) -> KeyRecord | None:
            row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} WHERE k.key_hash = $1", key_hash)
            return None if row is None else _key_record(row)

        return await self._read(tx)

    async def list_keys(self, user: str | None = None) -> list[KeyRecord]:
        async def tx(conn: Conn) -> list[KeyRecord]:
            if user is None:
                rows = await conn.fetch(f"SELECT {_KEY_COLUMNS} ORDER BY k.created_at, k.id")
            else:
                user_id = await self._account_id(conn, AccountKind.USER, user)
                rows = await conn.fetch(
                    f"SELECT {_KEY_COLUMNS} WHERE k.user_account_id = $1 ORDER BY k.created_at, k.id", user_id
                )
            return [_key_record(row) for row in rows]

        return await self._read(tx)

    @staticmethod
    async def _match_one(conn: Conn, table: str, id_or_prefix: str, what: str) -> str:
        """The id of the one row of ``table`` whose id is ``id_or_prefix`` or whose id or prefix
        starts with it."""
        exact = await conn.fetchval(f"SELECT id FROM {table} WHERE id = $1", id_or_prefix)
        if exact is not None:
            return str(exact)
        n = len(id_or_prefix)
        matches = [
            row[0]
            for row in await conn.fetch(
                f"SELECT id FROM {table} WHERE left(prefix, $1) = $2 OR left(id, $1) = $2 ORDER BY id",
                n,
                id_or_prefix,
            )
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

    async def revoke_key(self, id_or_prefix: str) -> KeyRecord:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the key id or the start of its prefix")

        async def tx(conn: Conn) -> KeyRecord:
            key_id = await self._match_one(conn, "keys", id_or_prefix, "key")
            await conn.execute(
                "UPDATE keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2", self._clock(), key_id
            )
            return await self._key_by_id(conn, key_id)

        return await self._run(tx, idempotent=True)

    async def revoked_since(self, since: float) -> list[str]:
        async def tx(conn: Conn) -> list[str]:
            rows = await conn.fetch("SELECT id FROM keys WHERE revoked_at >= $1 ORDER BY revoked_at, id", float(since))
            return [row[0] for row in rows]

        return await self._read(tx)

    async def touch_keys(self, last_used: Mapping[str, float]) -> None:
        pairs = _require_key_times(last_used)
        if not pairs:
            return
        ids = [key_id for key_id, _ in pairs]
        times = [when for _, when in pairs]

        async def tx(conn: Conn) -> None:
            # One statement. The rows are locked in id order first (FOR NO KEY UPDATE, as the batched
            # holds lock keys), so two replicas flushing at once wait for each other instead of
            # deadlocking; GREATEST ignores a NULL and keeps the newer time (an older one changes nothing).
            await conn.execute(
                "WITH v AS (SELECT * FROM unnest($1::text[], $2::double precision[]) AS v (id, t)), "
                "locked AS MATERIALIZED (SELECT k.id FROM keys k JOIN v ON v.id = k.id "
                "ORDER BY k.id FOR NO KEY UPDATE OF k) "
                "UPDATE keys k SET last_used_at = GREATEST(k.last_used_at, v.t) "
                "FROM v JOIN locked l ON l.id = v.id WHERE k.id = v.id",
                ids,
                times,
            )

        await self._run(tx, idempotent=True)

    @staticmethod
    async def _key_by_id(conn: Conn, key_id: str) -> KeyRecord:
        row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} WHERE k.id = $1", key_id)
        if row is None:
            raise NotFound(f"no key {key_id!r}")
        return _key_record(row)

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

        async def tx(conn: Conn) -> ServiceToken:
            developer_id = await self._account_id(conn, AccountKind.DEVELOPER, developer)
            token_id = "tok_" + secrets.token_hex(6)
            inserted = await conn.fetchval(
                "INSERT INTO service_tokens (id, developer_account_id, servers, token_hash, prefix, created_at) "
                "VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (token_hash) DO NOTHING RETURNING id",
                token_id,
                developer_id,
                names,
                token_hash,
                prefix,
                self._clock(),
            )
            if inserted is None:
                raise AlreadyExists("a service token with this secret already exists")
            return _token(await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} WHERE t.id = $1", token_id))

        return await self._run(tx, idempotent=False)

    async def find_service_token(self, token_hash: str) -> ServiceToken | None:
        async def tx(conn: Conn) -> ServiceToken | None:
            row = await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} WHERE t.token_hash = $1", token_hash)
            return None if row is None else _token(row)

        return await self._read(tx)

    async def list_service_tokens(self, developer: str | None = None) -> list[ServiceToken]:
        async def tx(conn: Conn) -> list[ServiceToken]:
            developer_id = None if developer is None else await self._account_id(conn, AccountKind.DEVELOPER, developer)
            rows = await conn.fetch(
                f"SELECT {_TOKEN_COLUMNS} WHERE ($1::bigint IS NULL OR t.developer_account_id = $1) "
                "ORDER BY t.created_at, t.id",
                developer_id,
            )
            return [_token(row) for row in rows]

        return await self._read(tx)

    async def revoke_service_token(self, id_or_prefix: str) -> ServiceToken:
        if not isinstance(id_or_prefix, str) or not id_or_prefix:
            raise InvalidInput("give the service token id or the start of its prefix")

        async def tx(conn: Conn) -> ServiceToken:
            token_id = await self._match_one(conn, "service_tokens", id_or_prefix, "service token")
            await conn.execute(
                "UPDATE service_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
                self._clock(),
                token_id,
            )
            return _token(await conn.fetchrow(f"SELECT {_TOKEN_COLUMNS} WHERE t.id = $1", token_id))

        return await self._run(tx, idempotent=True)
