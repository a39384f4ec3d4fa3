"""What a move to another store (``agentpay ledger export`` / ``import``) carries of OAuth: registered
clients, grants (each names the ledger key it pays with, which the ledger's own rows carry), and the
live access and refresh tokens (hashes), so a connected client keeps working after the move.
Authorization codes (minutes long) stay behind."""

from __future__ import annotations

from gateway.oauth.postgres_store import MIGRATIONS as POSTGRES_MIGRATIONS
from gateway.oauth.sqlite_store import MIGRATIONS as SQLITE_MIGRATIONS
from gateway.oauth.store import CONCERN
from gateway.storage.carry import Carried, CarriedTable, Kind

_TOKEN_END: tuple[str, Kind] = ("expires_at", "float")

CARRIED = Carried(
    concern=CONCERN,
    sqlite_migrations=SQLITE_MIGRATIONS,
    postgres_migrations=POSTGRES_MIGRATIONS,
    tables=(
        CarriedTable(
            "oauth_clients",
            (
                ("client_id", "text"),
                ("client_name", "text"),
                ("client_uri", "text"),
                ("redirect_uris", "text"),
                ("auth_method", "text"),
                ("secret_hash", "text"),
                ("created_at", "float"),
            ),
            order_by=("client_id",),
        ),
        CarriedTable(
            "oauth_grants",
            (
                ("id", "text"),
                ("client_id", "text"),
                ("client_name", "text"),
                ("user_name", "text"),
                ("login_id", "text"),
                ("server", "text"),
                ("resource", "text"),
                ("scope", "text"),
                ("key_id", "text"),
                ("key_hash", "text"),
                ("key_prefix", "text"),
                ("spend_limit", "int"),
                ("created_at", "float"),
                ("revoked_at", "float"),
            ),
            order_by=("id",),
        ),
        CarriedTable(
            "oauth_access_tokens",
            (("token_hash", "text"), ("grant_id", "text"), ("client_id", "text"), _TOKEN_END, ("revoked_at", "float")),
            order_by=("token_hash",),
        ),
        CarriedTable(
            "oauth_refresh_tokens",
            (("token_hash", "text"), ("grant_id", "text"), ("client_id", "text"), _TOKEN_END, ("used_at", "float")),
            order_by=("token_hash",),
        ),
    ),
)
