"""The OAuth tables' interface; ``sqlite_store`` and ``postgres_store`` implement it on the side
stores (``gateway.storage``) of the ledger's database. Only hashes of codes and tokens are stored."""

from __future__ import annotations

from typing import Protocol

from gateway.oauth.models import AccessToken, Client, CodeRecord, Grant, RefreshRecord

CONCERN = "oauth"


class OAuthStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def save_client(self, client: Client) -> None: ...

    async def get_client(self, client_id: str) -> Client | None:
        """A dynamically registered client (metadata-document clients are not stored)."""

    async def save_grant(self, grant: Grant) -> None: ...

    async def get_grant(self, grant_id: str) -> Grant | None: ...

    async def active_grant(self, user: str, server: str, client_id: str) -> Grant | None:
        """The newest unrevoked grant of this user to this client on this server."""

    async def grants_for_user(self, user: str) -> list[Grant]:
        """The user's unrevoked grants, newest first."""

    async def revoke_grant(self, grant_id: str, now: float) -> bool:
        """Mark a grant revoked (its tokens stop with it); False when it already was."""

    async def save_code(self, code_hash: str, code: CodeRecord) -> None: ...

    async def redeem_code(self, code_hash: str, now: float) -> CodeRecord | None:
        """The code as it was before this call, marked used by it (atomically: of two concurrent
        redemptions one sees ``used_at`` set). None for an unknown code."""

    async def save_tokens(
        self,
        *,
        grant_id: str,
        client_id: str,
        access_hash: str,
        access_expires_at: float,
        refresh_hash: str,
        refresh_expires_at: float,
    ) -> None: ...

    async def rotate_refresh(self, refresh_hash: str, now: float) -> RefreshRecord | None:
        """The refresh token as it was before this call, marked used by it (atomically, as codes)."""

    async def find_refresh(self, refresh_hash: str) -> RefreshRecord | None: ...

    async def find_access_token(self, access_hash: str) -> AccessToken | None: ...

    async def revoke_access_token(self, access_hash: str, client_id: str, now: float) -> bool:
        """Revoke one access token of ``client_id``'s grants; False when unknown or another client's."""

    async def purge(self, before: float) -> int:
        """Delete codes and tokens that expired before ``before``; returns how many rows went."""

    async def purge_unused_clients(self, registered_before: float) -> int:
        """Delete dynamic registrations (``apc_…``) made before ``registered_before`` that no grant
        names (abandoned, or a flood of registrations); returns how many went."""


def open_store(database_url: str) -> OAuthStore:
    """The OAuth store on the ledger's database (not yet opened)."""
    from gateway.ledger import POSTGRES_SCHEMES, SQLITE_SCHEME, split_schema

    if database_url.startswith(SQLITE_SCHEME):
        from gateway.oauth.sqlite_store import SqliteOAuthStore

        return SqliteOAuthStore(database_url[len(SQLITE_SCHEME) :])
    if database_url.startswith(POSTGRES_SCHEMES):
        from gateway.oauth.postgres_store import PostgresOAuthStore

        dsn, schema = split_schema(database_url)
        return PostgresOAuthStore(dsn, schema=schema)
    raise ValueError(f"unsupported database URL {database_url.split(':', 1)[0]!r}")
