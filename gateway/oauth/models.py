"""OAuth records and constants. Tokens and codes are random secrets shown once and stored hashed
(``gateway.keys.hash_secret``), like API keys; a type prefix tells them apart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ACCESS_TOKEN_PREFIX = "apat_"
REFRESH_TOKEN_PREFIX = "aprt_"
CODE_PREFIX = "apac_"
CLIENT_SECRET_PREFIX = "apcs_"
DCR_CLIENT_PREFIX = "apc_"
GRANT_KEY_PREFIX = "apoa_"  # the display prefix of a grant's key record ("OAuth" in the key list)
CODE_TTL_S = 120.0  # an authorization code is usable this long, once
DEFAULT_SCOPE = "mcp"
SUPPORTED_SCOPES = (DEFAULT_SCOPE,)

AuthMethod = Literal["none", "client_secret_post", "client_secret_basic"]
AUTH_METHODS: tuple[AuthMethod, ...] = ("none", "client_secret_post", "client_secret_basic")


@dataclass(frozen=True, slots=True)
class Client:
    """A registered (RFC 7591) or metadata-document (CIMD) client."""

    client_id: str
    client_name: str | None
    redirect_uris: tuple[str, ...]
    auth_method: AuthMethod
    kind: Literal["dcr", "cimd"]
    created_at: float
    client_uri: str | None = None
    secret_hash: str | None = None  # client_secret_post / _basic: the SHA-256 of the secret


@dataclass(frozen=True, slots=True)
class Grant:
    """A user's consent for one client on one server: it owns one ledger key record."""

    id: str
    client_id: str
    client_name: str | None
    user: str  # the ledger user account charged
    login_id: str
    server: str
    resource: str
    scope: str
    key_id: str
    key_hash: str  # hash of a secret nobody holds: tokens resolve to the key through it
    key_prefix: str
    spend_limit: int | None  # millicents
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True, slots=True)
class CodeRecord:
    grant_id: str
    client_id: str
    redirect_uri: str
    resource: str
    scope: str
    code_challenge: str
    expires_at: float
    used_at: float | None  # set by the first redemption; a second one finds it set


@dataclass(frozen=True, slots=True)
class AccessToken:
    """What an access token resolves to."""

    grant_id: str
    server: str
    key_hash: str
    expires_at: float
    revoked: bool  # the token itself or its grant


@dataclass(frozen=True, slots=True)
class RefreshRecord:
    grant_id: str
    client_id: str
    expires_at: float
    used_at: float | None  # rotated: a second use is a replay
