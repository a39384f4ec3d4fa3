"""The OAuth tables on PostgreSQL (a ``gateway.storage.PostgresSide`` in the ledger's schema)."""

from __future__ import annotations

import json

from gateway.oauth.models import DCR_CLIENT_PREFIX, AccessToken, Client, CodeRecord, Grant, RefreshRecord
from gateway.oauth.rows import GRANT_COLUMNS, client_of, grant_of
from gateway.oauth.store import CONCERN
from gateway.storage import Migration, PostgresSide
from gateway.storage.postgres import Conn

MIGRATIONS: tuple[Migration, ...] = (
    (
        "oauth_0001_initial",
        """
CREATE TABLE oauth_clients (
    client_id     TEXT PRIMARY KEY,
    client_name   TEXT,
    client_uri    TEXT,
    redirect_uris TEXT NOT NULL,
    auth_method   TEXT NOT NULL CHECK (auth_method IN ('none', 'client_secret_post', 'client_secret_basic')),
    secret_hash   TEXT,
    created_at    DOUBLE PRECISION NOT NULL
);
CREATE TABLE oauth_grants (
    id          TEXT PRIMARY KEY,
    client_id   TEXT NOT NULL,
    client_name TEXT,
    user_name   TEXT NOT NULL,
    login_id    TEXT NOT NULL,
    server      TEXT NOT NULL,
    resource    TEXT NOT NULL,
    scope       TEXT NOT NULL,
    key_id      TEXT NOT NULL,
    key_hash    TEXT NOT NULL,
    key_prefix  TEXT NOT NULL,
    spend_limit BIGINT CHECK (spend_limit IS NULL OR spend_limit >= 0),
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION
);
CREATE INDEX oauth_grants_user ON oauth_grants (user_name, server, client_id);
CREATE TABLE oauth_codes (
    code_hash      TEXT PRIMARY KEY,
    grant_id       TEXT NOT NULL REFERENCES oauth_grants (id),
    client_id      TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    resource       TEXT NOT NULL,
    scope          TEXT NOT NULL,
    code_challenge TEXT NOT NULL,
    expires_at     DOUBLE PRECISION NOT NULL,
    used_at        DOUBLE PRECISION
);
CREATE TABLE oauth_access_tokens (
    token_hash TEXT PRIMARY KEY,
    grant_id   TEXT NOT NULL REFERENCES oauth_grants (id),
    client_id  TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE INDEX oauth_access_tokens_expiry ON oauth_access_tokens (expires_at);
CREATE TABLE oauth_refresh_tokens (
    token_hash TEXT PRIMARY KEY,
    grant_id   TEXT NOT NULL REFERENCES oauth_grants (id),
    client_id  TEXT NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL,
    used_at    DOUBLE PRECISION
);
CREATE INDEX oauth_refresh_tokens_expiry ON oauth_refresh_tokens (expires_at);
""",
    ),
)


class PostgresOAuthStore:
    def __init__(self, dsn: str, *, schema: str | None) -> None:
        self._side = PostgresSide(dsn, schema=schema, concern=CONCERN, migrations=MIGRATIONS)

    async def open(self) -> None:
        await self._side.open()

    async def close(self) -> None:
        await self._side.close()

    async def save_client(self, client: Client) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                "INSERT INTO oauth_clients (client_id, client_name, client_uri, redirect_uris, auth_method, "
                "secret_hash, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                client.client_id,
                client.client_name,
                client.client_uri,
                json.dumps(list(client.redirect_uris)),
                client.auth_method,
                client.secret_hash,
                client.created_at,
            )

        await self._side.transaction(tx)

    async def get_client(self, client_id: str) -> Client | None:
        async def tx(c: Conn) -> Client | None:
            row = await c.fetchrow(
                "SELECT client_id, client_name, client_uri, redirect_uris, auth_method, secret_hash, created_at "
                "FROM oauth_clients WHERE client_id = $1",
                client_id,
            )
            return None if row is None else client_of(row)

        return await self._side.transaction(tx)

    async def save_grant(self, grant: Grant) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                f"INSERT INTO oauth_grants ({GRANT_COLUMNS}) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                grant.id,
                grant.client_id,
                grant.client_name,
                grant.user,
                grant.login_id,
                grant.server,
                grant.resource,
                grant.scope,
                grant.key_id,
                grant.key_hash,
                grant.key_prefix,
                grant.spend_limit,
                grant.created_at,
                grant.revoked_at,
            )

        await self._side.transaction(tx)

    async def get_grant(self, grant_id: str) -> Grant | None:
        async def tx(c: Conn) -> Grant | None:
            row = await c.fetchrow(f"SELECT {GRANT_COLUMNS} FROM oauth_grants WHERE id = $1", grant_id)
            return None if row is None else grant_of(row)

        return await self._side.transaction(tx)

    async def active_grant(self, user: str, server: str, client_id: str) -> Grant | None:
        async def tx(c: Conn) -> Grant | None:
            row = await c.fetchrow(
                f"SELECT {GRANT_COLUMNS} FROM oauth_grants WHERE user_name = $1 AND server = $2 AND client_id = $3 "
                "AND revoked_at IS NULL ORDER BY created_at DESC LIMIT 1",
                user,
                server,
                client_id,
            )
            return None if row is None else grant_of(row)

        return await self._side.transaction(tx)

    async def grants_for_user(self, user: str) -> list[Grant]:
        async def tx(c: Conn) -> list[Grant]:
            rows = await c.fetch(
                f"SELECT {GRANT_COLUMNS} FROM oauth_grants WHERE user_name = $1 AND revoked_at IS NULL "
                "ORDER BY created_at DESC",
                user,
            )
            return [grant_of(row) for row in rows]

        return await self._side.transaction(tx)

    async def revoke_grant(self, grant_id: str, now: float) -> bool:
        async def tx(c: Conn) -> bool:
            status = await c.execute(
                "UPDATE oauth_grants SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL", now, grant_id
            )
            return bool(status == "UPDATE 1")

        return await self._side.transaction(tx)

    async def save_code(self, code_hash: str, code: CodeRecord) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                "INSERT INTO oauth_codes (code_hash, grant_id, client_id, redirect_uri, resource, scope, "
                "code_challenge, expires_at, used_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                code_hash,
                code.grant_id,
                code.client_id,
                code.redirect_uri,
                code.resource,
                code.scope,
                code.code_challenge,
                code.expires_at,
                code.used_at,
            )

        await self._side.transaction(tx)

    async def redeem_code(self, code_hash: str, now: float) -> CodeRecord | None:
        async def tx(c: Conn) -> CodeRecord | None:
            row = await c.fetchrow(
                "SELECT grant_id, client_id, redirect_uri, resource, scope, code_challenge, expires_at, used_at "
                "FROM oauth_codes WHERE code_hash = $1 FOR UPDATE",
                code_hash,
            )
            if row is None:
                return None
            if row[7] is None:
                await c.execute("UPDATE oauth_codes SET used_at = $1 WHERE code_hash = $2", now, code_hash)
            return CodeRecord(*row)

        return await self._side.transaction(tx)

    async def save_tokens(
        self,
        *,
        grant_id: str,
        client_id: str,
        access_hash: str,
        access_expires_at: float,
        refresh_hash: str,
        refresh_expires_at: float,
    ) -> None:
        async def tx(c: Conn) -> None:
            await c.execute(
                "INSERT INTO oauth_access_tokens (token_hash, grant_id, client_id, expires_at) VALUES ($1, $2, $3, $4)",
                access_hash,
                grant_id,
                client_id,
                access_expires_at,
            )
            await c.execute(
                "INSERT INTO oauth_refresh_tokens (token_hash, grant_id, client_id, expires_at) "
                "VALUES ($1, $2, $3, $4)",
                refresh_hash,
                grant_id,
                client_id,
                refresh_expires_at,
            )

        await self._side.transaction(tx)

    async def rotate_refresh(self, refresh_hash: str, now: float) -> RefreshRecord | None:
        async def tx(c: Conn) -> RefreshRecord | None:
            row = await c.fetchrow(
                "SELECT grant_id, client_id, expires_at, used_at FROM oauth_refresh_tokens WHERE token_hash = $1 "
                "FOR UPDATE",
                refresh_hash,
            )
            if row is None:
                return None
            if row[3] is None:
                await c.execute("UPDATE oauth_refresh_tokens SET used_at = $1 WHERE token_hash = $2", now, refresh_hash)
            return RefreshRecord(*row)

        return await self._side.transaction(tx)

    async def find_refresh(self, refresh_hash: str) -> RefreshRecord | None:
        async def tx(c: Conn) -> RefreshRecord | None:
            row = await c.fetchrow(
                "SELECT grant_id, client_id, expires_at, used_at FROM oauth_refresh_tokens WHERE token_hash = $1",
                refresh_hash,
            )
            return None if row is None else RefreshRecord(*row)

        return await self._side.transaction(tx)

    async def find_access_token(self, access_hash: str) -> AccessToken | None:
        async def tx(c: Conn) -> AccessToken | None:
            row = await c.fetchrow(
                "SELECT t.grant_id, g.server, g.key_hash, t.expires_at, "
                "t.revoked_at IS NOT NULL OR g.revoked_at IS NOT NULL "
                "FROM oauth_access_tokens t JOIN oauth_grants g ON g.id = t.grant_id WHERE t.token_hash = $1",
                access_hash,
            )
            return None if row is None else AccessToken(row[0], row[1], row[2], row[3], bool(row[4]))

        return await self._side.transaction(tx)

    async def revoke_access_token(self, access_hash: str, client_id: str, now: float) -> bool:
        async def tx(c: Conn) -> bool:
            status = await c.execute(
                "UPDATE oauth_access_tokens SET revoked_at = $1 WHERE token_hash = $2 AND client_id = $3 "
                "AND revoked_at IS NULL",
                now,
                access_hash,
                client_id,
            )
            return bool(status == "UPDATE 1")

        return await self._side.transaction(tx)

    async def purge(self, before: float) -> int:
        async def tx(c: Conn) -> int:
            n = 0
            for table in ("oauth_codes", "oauth_access_tokens", "oauth_refresh_tokens"):
                status = await c.execute(f"DELETE FROM {table} WHERE expires_at < $1", before)
                n += int(status.rsplit(" ", 1)[1])
            return n

        return await self._side.transaction(tx)

    async def purge_unused_clients(self, registered_before: float) -> int:
        async def tx(c: Conn) -> int:
            status = await c.execute(
                "DELETE FROM oauth_clients c WHERE c.created_at < $1 AND left(c.client_id, $2) = $3 "
                "AND NOT EXISTS (SELECT 1 FROM oauth_grants g WHERE g.client_id = c.client_id)",
                registered_before,
                len(DCR_CLIENT_PREFIX),
                DCR_CLIENT_PREFIX,
            )
            return int(status.rsplit(" ", 1)[1])

        return await self._side.transaction(tx)
