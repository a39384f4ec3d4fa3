"""The authorization server's decisions, without HTTP: clients, authorization requests, codes,
tokens, refresh rotation, revocation and grants. ``views`` turns requests into calls here.

A grant is a key: approving creates (or reuses) a ledger key record for the user on the server, with
the chosen spend limit, and every token of the grant resolves to that key. Revoking a grant revokes
the key, so billing, caps, usage, the key list and revocation work as for API keys.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

from gateway.config import GatewayConfig
from gateway.errors import BadRequest, OAuthError, Unavailable, UnknownServer
from gateway.keys import constant_time_equals, generate_secret, hash_secret
from gateway.ledger.base import KEY_NAME_MAX
from gateway.ledger.interfaces import Keys
from gateway.oauth import clients
from gateway.oauth.clients import ClientRejected, MetadataFetcher
from gateway.oauth.consent import Tickets
from gateway.oauth.models import (
    ACCESS_TOKEN_PREFIX,
    CLIENT_SECRET_PREFIX,
    CODE_PREFIX,
    CODE_TTL_S,
    DCR_CLIENT_PREFIX,
    DEFAULT_SCOPE,
    GRANT_KEY_PREFIX,
    REFRESH_TOKEN_PREFIX,
    SUPPORTED_SCOPES,
    Client,
    CodeRecord,
    Grant,
)
from gateway.oauth.redirects import find_redirect
from gateway.oauth.store import OAuthStore
from gateway.proxy.limits import KeyLimits
from gateway.proxy.routing import Router, host_name

log = structlog.get_logger("gateway.oauth")
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
_MAX_PARAM = 2000
REGISTRATION_BURST = 30
UNUSED_CLIENT_S = 7 * 86400.0  # a dynamic registration no grant uses is deleted this long after it was made


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """A checked authorization request: everything the consent page shows and the approval uses."""

    client: Client
    redirect_uri: str
    state: str | None
    code_challenge: str
    resource: str
    server: str
    scope: str


class AuthorizePageError(Exception):
    """An authorization request that cannot be sent back to the client (unknown client, redirect URI
    not registered): the user is shown the message instead of being redirected anywhere."""


class AuthorizeRedirectError(Exception):
    """An authorization request refused with a redirect carrying ``error`` (RFC 6749 §4.1.2.1)."""

    def __init__(self, location: str, message: str) -> None:
        super().__init__(message)
        self.location = location


def with_params(uri: str, params: Mapping[str, str | None]) -> str:
    """``uri`` with ``params`` added to its query (keeping the query it has)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [(k, v) for k, v in params.items() if v is not None]
    return urlunsplit(parts._replace(query=urlencode(query)))


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).decode("ascii").rstrip("=")


class OAuthService:
    def __init__(
        self,
        *,
        store: OAuthStore,
        keys: Keys,
        config: GatewayConfig,
        issuer: str,
        consent_secret: bytes,
        fetcher: MetadataFetcher | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.tickets = Tickets(consent_secret)
        self.keys = keys
        self.config = config
        self.issuer = issuer
        self.fetcher = fetcher or MetadataFetcher(allowed_hosts=config.oauth.client_metadata_hosts_allowed)
        self.clock = clock
        # dynamic registration is an unauthenticated write: a burst, then one a second, per address
        self.registrations = KeyLimits(max_concurrent=0, rate_per_s=1.0, burst=REGISTRATION_BURST)
        self._hosts = {host.lower(): name for name, srv in config.servers.items() for host in srv.hosts}
        self._router = Router(frozenset(config.servers), self._hosts)

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        await self.fetcher.close()
        await self.store.close()

    # --- clients --------------------------------------------------------------------------------
    async def register(self, doc: object) -> tuple[Client, str | None]:
        """RFC 7591: the registered client and its secret (None for ``none``), or OAuthError."""
        secret = generate_secret(CLIENT_SECRET_PREFIX) if clients.wants_secret(doc) else None
        try:
            client = clients.registration(
                doc,
                client_id=DCR_CLIENT_PREFIX + secrets.token_urlsafe(16),
                secret_hash=hash_secret(secret) if secret else None,
                now=self.clock(),
            )
        except ClientRejected as exc:
            error = "invalid_redirect_uri" if "redirect" in str(exc) else "invalid_client_metadata"
            raise OAuthError(error, str(exc)) from None
        await self.store.save_client(client)
        return client, secret

    async def client(self, client_id: str | None) -> Client | None:
        """The client a client_id names (a registration, or a fetched metadata document); None when
        unknown. Raises ClientRejected for a metadata document that cannot be used."""
        if not client_id or len(client_id) > _MAX_PARAM:
            return None
        if clients.is_metadata_url(client_id):
            return await self.fetcher.client(client_id)
        if not client_id.startswith(DCR_CLIENT_PREFIX):
            return None
        return await self.store.get_client(client_id)

    # --- resources ------------------------------------------------------------------------------
    def server_for(self, resource: str) -> str | None:
        """The server a resource URL names: ``<issuer>/<server>/mcp``, or ``https://<server host>/mcp``
        for a Host-routed server. A URL on any other origin names none of ours: a token asked for it
        would be sent there (RFC 8707)."""
        if not resource or len(resource) > _MAX_PARAM:
            return None
        try:
            parts = urlsplit(resource)
            route = self._router.resolve(parts.netloc, parts.path or "/")
        except (ValueError, UnknownServer, BadRequest):
            return None
        if parts.scheme not in ("http", "https") or parts.query or parts.fragment or "#" in resource:
            return None
        if route.path_key is not None or route.endpoint not in ("mcp", "sse"):
            return None
        netloc = parts.netloc.lower().rstrip(".")
        host_routed = self._hosts.get(netloc) or self._hosts.get(host_name(netloc) or "")
        if host_routed != route.server and f"{parts.scheme}://{netloc}" != self.issuer:
            return None
        return route.server

    # --- authorization --------------------------------------------------------------------------
    async def check_request(self, params: Mapping[str, str]) -> AuthorizationRequest:
        """Check an authorization request (the query of GET, or the consent form's fields)."""
        try:
            client = await self.client(params.get("client_id"))
        except ClientRejected as exc:
            raise AuthorizePageError(f"The application's client metadata document cannot be used: {exc}") from None
        if client is None:
            raise AuthorizePageError(
                "This application is not registered here (unknown client_id); reconnect it from the application"
            )
        redirect_uri = find_redirect(params.get("redirect_uri"), client.redirect_uris)
        if redirect_uri is None:
            raise AuthorizePageError(
                "The redirect_uri is missing or not one the application registered, so the answer cannot be sent back"
            )
        state = params.get("state")

        def refuse(error: str, message: str) -> AuthorizeRedirectError:
            location = with_params(
                redirect_uri, {"error": error, "error_description": message, "state": state, "iss": self.issuer}
            )
            return AuthorizeRedirectError(location, message)

        if params.get("response_type") != "code":
            raise refuse("unsupported_response_type", "response_type must be code")
        challenge = params.get("code_challenge") or ""
        if params.get("code_challenge_method") != "S256" or not _CHALLENGE.match(challenge):
            raise refuse("invalid_request", "PKCE is required: send code_challenge with code_challenge_method S256")
        resource = params.get("resource") or ""
        if not resource:
            raise refuse("invalid_target", "resource is required: the URL of the MCP server to connect")
        server = self.server_for(resource)
        if server is None:
            raise refuse("invalid_target", "resource is not an MCP server served here")
        if state is not None and len(state) > _MAX_PARAM:
            raise refuse("invalid_request", "state is too long")
        return AuthorizationRequest(
            client=client,
            redirect_uri=redirect_uri,
            state=state,
            code_challenge=challenge,
            resource=resource,
            server=server,
            scope=self.granted_scope(params.get("scope")),
        )

    @staticmethod
    def granted_scope(requested: str | None) -> str:
        """The scope granted: the supported scopes asked for; the default scope when none (or no scope)
        was asked for (clients reconnecting without a scope are not refused)."""
        asked = [s for s in (requested or "").split() if s in SUPPORTED_SCOPES]
        return " ".join(dict.fromkeys(asked)) or DEFAULT_SCOPE

    def deny(self, req: AuthorizationRequest) -> str:
        return with_params(
            req.redirect_uri,
            {
                "error": "access_denied",
                "error_description": "The user declined",
                "state": req.state,
                "iss": self.issuer,
            },
        )

    async def approve(self, req: AuthorizationRequest, *, user: str, login_id: str, spend_limit: int | None) -> str:
        """Record the consent (a grant and its key) and return the redirect carrying the code."""
        now = self.clock()
        grant = await self._grant_for(req, user=user, login_id=login_id, spend_limit=spend_limit, now=now)
        code = generate_secret(CODE_PREFIX)
        await self.store.save_code(
            hash_secret(code),
            CodeRecord(
                grant_id=grant.id,
                client_id=req.client.client_id,
                redirect_uri=req.redirect_uri,
                resource=req.resource,
                scope=req.scope,
                code_challenge=req.code_challenge,
                expires_at=now + CODE_TTL_S,
                used_at=None,
            ),
        )
        return with_params(req.redirect_uri, {"code": code, "state": req.state, "iss": self.issuer})

    async def _grant_for(
        self, req: AuthorizationRequest, *, user: str, login_id: str, spend_limit: int | None, now: float
    ) -> Grant:
        existing = await self.store.active_grant(user, req.server, req.client.client_id)
        if existing is not None:
            key = await self.keys.find_key(existing.key_hash)
            usable = key is not None and key.revoked_at is None and (key.expires_at is None or key.expires_at > now)
            if usable and existing.spend_limit == spend_limit and existing.scope == req.scope:
                return existing  # the same consent again: the same key, its spending so far counts
            await self.revoke(existing)  # a new consent replaces the old one
        secret = generate_secret(GRANT_KEY_PREFIX)  # nobody ever holds it: tokens reach the key by its hash
        prefix = secret[: len(GRANT_KEY_PREFIX) + 8]
        key = await self.keys.create_key(
            user=user,
            server=req.server,
            key_hash=hash_secret(secret),
            prefix=prefix,
            expires_at=None,
            spend_limit=spend_limit,
            name=key_name(req.client),
        )
        grant = Grant(
            id="gnt_" + secrets.token_hex(12),
            client_id=req.client.client_id,
            client_name=req.client.client_name,
            user=user,
            login_id=login_id,
            server=req.server,
            resource=req.resource,
            scope=req.scope,
            key_id=key.id,
            key_hash=hash_secret(secret),
            key_prefix=prefix,
            spend_limit=spend_limit,
            created_at=now,
            revoked_at=None,
        )
        await self.store.save_grant(grant)
        return grant

    # --- token endpoint -------------------------------------------------------------------------
    async def token(self, form: Mapping[str, str], basic: tuple[str, str] | None) -> dict[str, Any]:
        client = await self._authenticate_client(form, basic)
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            return await self._redeem_code(client, form)
        if grant_type == "refresh_token":
            return await self._refresh(client, form)
        raise OAuthError("unsupported_grant_type", "grant_type must be authorization_code or refresh_token")

    async def _authenticate_client(self, form: Mapping[str, str], basic: tuple[str, str] | None) -> Client:
        client_id = basic[0] if basic else form.get("client_id")
        try:
            client = await self.client(client_id)
        except ClientRejected as exc:
            raise OAuthError(
                "invalid_client", f"the client metadata document cannot be used: {exc}", status=401
            ) from None
        if client is None:
            raise OAuthError("invalid_client", "unknown client_id", status=401, hint="Register the client again")
        if client.auth_method != "none":
            secret = basic[1] if basic else form.get("client_secret")
            if (
                not secret
                or client.secret_hash is None
                or not constant_time_equals(hash_secret(secret), client.secret_hash)
            ):
                raise OAuthError("invalid_client", "client authentication failed", status=401)
        return client

    async def _redeem_code(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        code, verifier = form.get("code"), form.get("code_verifier")
        if not code or not verifier:
            raise OAuthError("invalid_request", "code and code_verifier are required")
        now = self.clock()
        record = await self.store.redeem_code(hash_secret(code), now)
        if record is None:
            raise OAuthError("invalid_grant", "the authorization code is not valid")
        if record.used_at is not None:
            await self.revoke_grant_id(record.grant_id)  # a replayed code: what it gave is revoked too
            raise OAuthError("invalid_grant", "the authorization code was already used; its grant is revoked")
        if record.expires_at <= now:
            raise OAuthError("invalid_grant", "the authorization code has expired")
        if record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the authorization code was issued to another client")
        redirect_uri = form.get("redirect_uri")
        if redirect_uri is not None and redirect_uri != record.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri is not the one of the authorization request")
        resource = form.get("resource")  # the same server (a client may write the URL another way)
        if resource is not None and self.server_for(resource) != self.server_for(record.resource):
            raise OAuthError("invalid_target", "resource is not the server the code was issued for")
        if not _VERIFIER.match(verifier) or not constant_time_equals(s256(verifier), record.code_challenge):
            raise OAuthError("invalid_grant", "the code_verifier does not match the code_challenge (PKCE)")
        grant = await self.store.get_grant(record.grant_id)
        if grant is None or grant.revoked_at is not None:
            raise OAuthError("invalid_grant", "the grant of this code was revoked")
        return await self._issue(grant, client, now)

    async def _refresh(self, client: Client, form: Mapping[str, str]) -> dict[str, Any]:
        token = form.get("refresh_token")
        if not token:
            raise OAuthError("invalid_request", "refresh_token is required")
        now = self.clock()
        record = await self.store.rotate_refresh(hash_secret(token), now)
        if record is None:
            raise OAuthError("invalid_grant", "the refresh token is not valid")
        if record.used_at is not None:
            await self.revoke_grant_id(record.grant_id)  # RFC 9700 §4.14.2: a replay revokes the family
            raise OAuthError(
                "invalid_grant", "the refresh token was already used; the grant is revoked", hint="Sign in again"
            )
        if record.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the refresh token was issued to another client")
        if record.expires_at <= now:
            raise OAuthError("invalid_grant", "the refresh token has expired", hint="Sign in again")
        grant = await self.store.get_grant(record.grant_id)
        if grant is None or grant.revoked_at is not None:
            raise OAuthError("invalid_grant", "the grant was revoked", hint="Sign in again")
        key = await self.keys.find_key(grant.key_hash)
        if key is None or key.revoked_at is not None:
            await self.revoke(grant)
            raise OAuthError("invalid_grant", "the grant's key was revoked", hint="Sign in again")
        scope = form.get("scope")
        if scope is not None and not set(scope.split()) <= set(grant.scope.split()):
            raise OAuthError("invalid_scope", "a refresh cannot widen the scope")
        resource = form.get("resource")
        if resource is not None and self.server_for(resource) != grant.server:
            raise OAuthError("invalid_target", "resource is not the server this grant is for")
        return await self._issue(grant, client, now)

    async def _issue(self, grant: Grant, client: Client, now: float) -> dict[str, Any]:
        ttl = self.config.oauth
        access = generate_secret(ACCESS_TOKEN_PREFIX)
        refresh = generate_secret(REFRESH_TOKEN_PREFIX)
        await self.store.save_tokens(
            grant_id=grant.id,
            client_id=client.client_id,
            access_hash=hash_secret(access),
            access_expires_at=now + ttl.access_token_ttl_s,
            refresh_hash=hash_secret(refresh),
            refresh_expires_at=now + ttl.refresh_token_ttl_s,
        )
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl.access_token_ttl_s,
            "refresh_token": refresh,
            "scope": grant.scope,
        }

    # --- revocation -----------------------------------------------------------------------------
    async def revoke_token(self, form: Mapping[str, str], basic: tuple[str, str] | None) -> None:
        """RFC 7009: revoke a token of the calling client; unknown tokens are not an error."""
        client = await self._authenticate_client(form, basic)
        token = form.get("token")
        if not token:
            raise OAuthError("invalid_request", "token is required")
        digest = hash_secret(token)
        if token.startswith(REFRESH_TOKEN_PREFIX):
            record = await self.store.find_refresh(digest)
            if record is not None and record.client_id == client.client_id:
                await self.revoke_grant_id(record.grant_id)
        elif token.startswith(ACCESS_TOKEN_PREFIX):
            await self.store.revoke_access_token(digest, client.client_id, self.clock())

    async def revoke_grant_id(self, grant_id: str) -> None:
        grant = await self.store.get_grant(grant_id)
        if grant is not None:
            await self.revoke(grant)

    async def revoke(self, grant: Grant) -> None:
        """Revoke a grant and its key: its tokens stop within the key cache's lifetime."""
        await self.store.revoke_grant(grant.id, self.clock())
        await self.keys.revoke_key(grant.key_id)

    async def purge_forever(self, interval_s: float = 3600.0, keep_s: float = 86400.0) -> None:
        """Delete codes and tokens a day after they expired (a replayed one is then merely unknown),
        and dynamic registrations no grant uses ``UNUSED_CLIENT_S`` after they were made."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.store.purge(self.clock() - keep_s)
                await self.store.purge_unused_clients(self.clock() - UNUSED_CLIENT_S)
            except Unavailable as exc:  # the database is down: try again next time
                log.warning("oauth_purge_failed", error=exc.message)

    # --- the portal's view ----------------------------------------------------------------------
    async def connected(self, user: str) -> list[Grant]:
        return await self.store.grants_for_user(user)

    async def disconnect(self, user: str, grant_id: str) -> Grant | None:
        """Revoke one of ``user``'s grants; None when it is not theirs (or unknown)."""
        grant = await self.store.get_grant(grant_id)
        if grant is None or grant.user != user:
            return None
        await self.revoke(grant)
        return grant


def key_name(client: Client) -> str:
    """The name of a grant's key in the key list: which application holds it."""
    shown = "".join(c for c in (client.client_name or "") if c.isprintable()).strip()
    return f"OAuth: {shown or urlsplit(client.client_id).hostname or client.client_id}"[:KEY_NAME_MAX]
