"""Authenticating API keys against the ledger, with a short cache.

A cached key record is trusted for at most ``cache_s`` (default 1 s), so a revocation made by any
process (the CLI, another replica) takes effect within that bound.

OAuth access tokens (``apat_…``, issued by ``gateway.oauth``) are told apart by their prefix and
resolve to the key record of their grant, through the same cache: an API key costs what it did.

When a key last authenticated a call (its ``last_used_at``, shown on the keys lists) is noted in memory,
one dict assignment per call, and written by ``flush_last_used``: one ``touch_keys`` for every key used
since the previous flush, every ``LAST_USED_FLUSH_S`` seconds (``flush_last_used_forever``) and on drain.
So a key's last use as stored is at most that much behind (or lost with a crashed process, as no money
depends on it), and a busy gateway writes it once per key per interval rather than once per call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from gateway.errors import ExpiredKey, InvalidKey, InvalidToken, MissingKey, RevokedKey, WrongServer
from gateway.keys import display_prefix, hash_secret
from gateway.ledger.base import KeyRecord
from gateway.ledger.interfaces import Keys
from gateway.proxy.limits import FailureThrottle, TooManyRequests

_MAX_CACHE = 100_000
# Look-ups of keys and tokens nobody holds, per client address: 30 at once, then one a second. A key
# this process has seen valid (in the cache, fresh or stale) is never refused for its address; past the
# allowance an unknown one is refused (429, Retry-After) without asking the database, so random keys
# cannot turn into database load.
AUTH_FAILURE_BURST = 30
AUTH_FAILURES_PER_S = 1.0
LAST_USED_FLUSH_S = 30.0  # how often the last uses gathered in memory are written (and so how stale they are)
log = structlog.get_logger("gateway.proxy.auth")
ACCESS_TOKEN_PREFIX = "apat_"  # gateway.oauth.models.ACCESS_TOKEN_PREFIX


class TokenView(Protocol):
    """What an OAuth access token resolves to (``gateway.oauth.models.AccessToken``)."""

    @property
    def key_hash(self) -> str: ...

    @property
    def expires_at(self) -> float: ...

    @property
    def revoked(self) -> bool: ...


class AccessTokens(Protocol):
    async def find_access_token(self, access_hash: str) -> TokenView | None: ...


class Authenticator:
    def __init__(
        self,
        ledger: Keys,
        *,
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        tokens: AccessTokens | None = None,
        max_cache: int = _MAX_CACHE,
        failures: FailureThrottle | None = None,
    ) -> None:
        self._ledger = ledger
        self.failures = failures  # unknown keys and tokens per client address: past it, no look-up
        self._max_cache = max_cache  # entries per cache (keys, tokens): when full, it starts again
        self._cache_s = cache_s
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[str, tuple[KeyRecord, float]] = {}
        self._tokens = tokens
        self._token_cache: dict[str, tuple[TokenView, float]] = {}
        self._last_used: dict[str, float] = {}  # key id -> wall time of its last call, not yet written

    @property
    def cached(self) -> int:
        """Keys and tokens cached now (bounded: ``max_cache`` each)."""
        return len(self._cache) + len(self._token_cache)

    async def lookup(self, secret: str) -> KeyRecord | None:
        digest = hash_secret(secret)
        cached = self._cached(digest)
        if cached is not None:
            return cached
        return await self._fetch(digest)

    def _cached(self, digest: str) -> KeyRecord | None:
        cached = self._cache.get(digest)
        if cached is not None and self._clock() - cached[1] < self._cache_s:
            return cached[0]
        return None

    async def _fetch(self, digest: str) -> KeyRecord | None:
        now = self._clock()
        record = await self._ledger.find_key(digest)
        if record is not None:
            if len(self._cache) >= self._max_cache:
                self._cache.clear()
            self._cache[digest] = (record, now)
        return record

    def _may_look_up(self, client: Callable[[], str] | None) -> None:
        """TooManyRequests, before any look-up, for a client address out of failed look-ups."""
        if self.failures is None or client is None:
            return
        wait = self.failures.retry_after(client())
        if wait is not None:
            raise TooManyRequests(
                "Too many unknown keys or tokens from this address: it may try again later", retry_after_s=wait
            )

    def _failed(self, client: Callable[[], str] | None) -> None:
        if self.failures is not None and client is not None:
            self.failures.failed(client())

    async def authenticate(
        self, secret: str | None, server: str, *, client: Callable[[], str] | None = None
    ) -> KeyRecord:
        """The key record for a secret valid on ``server``, or an AuthError saying what is wrong.
        ``client``: gives the caller's address, throttled on keys and tokens nobody holds; asked only
        when the cache cannot answer (a cache hit costs no address parsing). A key this
        process has seen valid is never refused for its address, even once its cache entry is stale:
        behind a shared address (a NAT, a proxy not listed in ``trusted_proxies``) an attacker's
        failures must not lock out the users already known."""
        if not secret:
            raise MissingKey(f"No API key was sent for server {server!r}")
        if self._tokens is not None and secret.startswith(ACCESS_TOKEN_PREFIX):
            return await self._authenticate_token(secret, server, client)
        digest = hash_secret(secret)
        record = self._cached(digest)  # a cache hit needs no await
        if record is None:
            if digest not in self._cache:  # a key seen before (its entry stale) is looked up again freely
                self._may_look_up(client)
            record = await self._fetch(digest)
        if record is None:
            self._failed(client)
            raise InvalidKey(f"The API key {display_prefix(secret)} is not a valid AgentPay key")
        if record.revoked_at is not None:
            raise RevokedKey(f"The API key {record.prefix} has been revoked")
        if record.expires_at is not None and record.expires_at <= self._wall():
            raise ExpiredKey(f"The API key {record.prefix} has expired")
        if record.server != server:
            raise WrongServer(f"The API key {record.prefix} is for server {record.server!r}, not {server!r}")
        self._last_used[record.id] = self._wall()
        return record

    async def _authenticate_token(self, token: str, server: str, client: Callable[[], str] | None) -> KeyRecord:
        """The key record of an OAuth access token's grant. Unknown, expired or revoked tokens (and
        a revoked grant key) are InvalidToken (401, the client signs in again); a token of another
        server is WrongServer (403), as for keys."""
        assert self._tokens is not None
        digest = hash_secret(token)
        now = self._clock()
        cached = self._token_cache.get(digest)
        if cached is not None and now - cached[1] < self._cache_s:
            view: TokenView | None = cached[0]
        else:
            if cached is None:  # a token seen before (its entry stale) is looked up again freely
                self._may_look_up(client)
            view = await self._tokens.find_access_token(digest)
            if view is None:
                self._failed(client)
            else:
                if len(self._token_cache) >= self._max_cache:
                    self._token_cache.clear()
                self._token_cache[digest] = (view, now)
        if view is None or view.revoked:
            raise InvalidToken("The access token is not valid (unknown or revoked)")
        if view.expires_at <= self._wall():
            raise InvalidToken("The access token has expired", hint="Your client refreshes it or signs in again")
        record = self._cached(view.key_hash)
        if record is None:
            record = await self._fetch(view.key_hash)
        if record is None or record.revoked_at is not None:
            raise InvalidToken(
                "The access token's connection was revoked", hint="Reconnect the server to sign in again"
            )
        if record.expires_at is not None and record.expires_at <= self._wall():
            raise InvalidToken(
                "The access token's connection has expired", hint="Reconnect the server to sign in again"
            )
        if record.server != server:
            raise WrongServer(
                f"The access token is for server {record.server!r}, not {server!r}",
                hint="Each connection is for one server; connect this server's URL to sign in for it",
            )
        self._last_used[record.id] = self._wall()
        return record

    @property
    def unflushed(self) -> int:
        """How many keys have a last use not yet written."""
        return len(self._last_used)

    async def flush_last_used(self) -> int:
        """Write the last uses gathered since the previous flush in one ``touch_keys``; returns how
        many keys it wrote. Should the write fail (or be cancelled), they are kept for the next flush."""
        if not self._last_used:
            return 0
        batch, self._last_used = self._last_used, {}
        try:
            await self._ledger.touch_keys(batch)
        except BaseException:
            for key_id, when in batch.items():  # back for the next flush; a newer use meanwhile wins
                if self._last_used.get(key_id, 0.0) < when:
                    self._last_used[key_id] = when
            raise
        return len(batch)

    async def flush_last_used_forever(self, interval_s: float = LAST_USED_FLUSH_S) -> None:
        """``flush_last_used`` every ``interval_s`` seconds (the app's lifecycle also flushes on drain)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush_last_used()
            except Exception as exc:  # noqa: BLE001 - the flusher must outlive any store failure
                log.warning("last_used_flush_failed", error=str(exc), keys=len(self._last_used))
