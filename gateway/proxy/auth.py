"""Authenticating API keys against the ledger, with a short cache.

A cached key record is trusted for at most ``cache_s`` (default 1 s), so a revocation made by any
process (the CLI, another replica) takes effect within that bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.errors import ExpiredKey, InvalidKey, MissingKey, RevokedKey, WrongServer
from gateway.keys import display_prefix, hash_secret
from gateway.ledger.base import KeyRecord
from gateway.ledger.interfaces import Keys

_MAX_CACHE = 100_000


class Authenticator:
    def __init__(
        self,
        ledger: Keys,
        *,
        cache_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._ledger = ledger
        self._cache_s = cache_s
        self._clock = clock
        self._wall = wall_clock
        self._cache: dict[str, tuple[KeyRecord, float]] = {}

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
            if len(self._cache) >= _MAX_CACHE:
                self._cache.clear()
            self._cache[digest] = (record, now)
        return record

    async def authenticate(self, secret: str | None, server: str) -> KeyRecord:
        """The key record for a secret valid on ``server``, or an AuthError saying what is wrong."""
        if not secret:
            raise MissingKey(f"No API key was sent for server {server!r}")
        digest = hash_secret(secret)
        record = self._cached(digest)  # a cache hit needs no await
        if record is None:
            record = await self._fetch(digest)
        if record is None:
            raise InvalidKey(f"The API key {display_prefix(secret)} is not a valid AgentPay key")
        if record.revoked_at is not None:
            raise RevokedKey(f"The API key {record.prefix} has been revoked")
        if record.expires_at is not None and record.expires_at <= self._wall():
            raise ExpiredKey(f"The API key {record.prefix} has expired")
        if record.server != server:
            raise WrongServer(f"The API key {record.prefix} is for server {record.server!r}, not {server!r}")
        return record
