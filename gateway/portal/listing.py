"""What an upstream MCP server offers, asked by the gateway itself: ``initialize``, then
``tools/list``, ``resources/list``, ``resources/templates/list`` and ``prompts/list`` (every page),
over Streamable HTTP. The answers are cached per server (``Listings``) and refreshed in the
background once stale, so a catalog page never waits on a slow upstream more than once; an upstream
that is down or answers nonsense is shown as unavailable, never as an error page."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from gateway.config import GatewayConfig, ServerConfig
from gateway.protocol import sse

PROTOCOL_VERSION = "2025-11-25"
_MAX_PAGES = 20  # a paginating upstream that never ends its cursor chain is cut here
_MAX_BODY = 4 * 1024 * 1024

log = structlog.get_logger("gateway.portal")


class ListingFailed(Exception):
    """The upstream could not be listed (down, refused, or answered something that is not MCP)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One tool, resource (or resource template) or prompt, as the upstream describes it."""

    kind: str  # "tool" | "resource" | "prompt"
    name: str  # tool or prompt name, resource URI or URI template
    title: str
    description: str


@dataclass(frozen=True, slots=True)
class Listing:
    server: str
    entries: tuple[Entry, ...] = ()
    fetched_at: float | None = None  # None: never listed successfully
    error: str | None = None  # why the last attempt failed (None: it worked)

    @property
    def available(self) -> bool:
        return self.error is None and self.fetched_at is not None

    def of(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]


def _text(value: object, limit: int = 500) -> str:
    return value[:limit] if isinstance(value, str) else ""


class _Session:
    """One short MCP session with an upstream, for list calls only."""

    def __init__(self, http: aiohttp.ClientSession, server: ServerConfig) -> None:
        assert server.upstream is not None
        self._http = http
        self._url = server.upstream
        self._headers = {
            **server.upstream_headers,
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        self._next_id = 0

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        rid = f"portal-{self._next_id}"
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            body["params"] = params
        async with self._http.post(self._url, data=json.dumps(body), headers=self._headers) as resp:
            if resp.status >= 400:
                raise ListingFailed(f"{method}: the upstream answered HTTP {resp.status}")
            session_id = resp.headers.get("Mcp-Session-Id")
            if session_id is not None:
                self._headers["Mcp-Session-Id"] = session_id
            version = resp.headers.get("Mcp-Protocol-Version")
            if method == "initialize" and version:
                self._headers["Mcp-Protocol-Version"] = version
            message = await self._answer(resp, rid)
        if "error" in message:
            error = message["error"]
            text = error.get("message") if isinstance(error, dict) else None
            raise ListingFailed(f"{method}: the upstream answered an error: {_text(text, 200) or 'no message'}")
        result = message.get("result")
        if not isinstance(result, dict):
            raise ListingFailed(f"{method}: the upstream's answer has no result object")
        if method == "initialize":
            negotiated = result.get("protocolVersion")
            if isinstance(negotiated, str):
                self._headers["Mcp-Protocol-Version"] = negotiated
        return result

    async def notify(self, method: str) -> None:
        body = {"jsonrpc": "2.0", "method": method}
        async with self._http.post(self._url, data=json.dumps(body), headers=self._headers) as resp:
            await resp.read()

    async def close(self) -> None:
        if "Mcp-Session-Id" in self._headers:
            async with self._http.delete(self._url, headers=self._headers) as resp:
                await resp.read()

    async def _answer(self, resp: aiohttp.ClientResponse, rid: str) -> dict[str, Any]:
        kind = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind == "text/event-stream":
            parser = sse.Parser(max_event_bytes=_MAX_BODY)
            async for chunk in resp.content.iter_any():
                for event in parser.feed(chunk):
                    message = _message(event.data, rid)
                    if message is not None:
                        return message
            raise ListingFailed("the upstream's event stream ended without an answer")
        raw = await resp.content.read(_MAX_BODY + 1)
        if len(raw) > _MAX_BODY:
            raise ListingFailed("the upstream's answer is too large")
        message = _message(raw.decode("utf-8", errors="replace"), rid)
        if message is None:
            raise ListingFailed("the upstream's answer is not a JSON-RPC response to the request")
        return message


def _message(data: str | None, rid: str) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, dict) and item.get("id") == rid and ("result" in item or "error" in item):
            return item
    return None


async def _pages(session: _Session, method: str, member: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        result = await session.request(method, {"cursor": cursor} if cursor else {})
        items = result.get(member)
        if isinstance(items, list):
            out.extend(i for i in items if isinstance(i, dict))
        following = result.get("nextCursor")
        if not isinstance(following, str) or not following:
            break
        cursor = following
    return out


async def list_server(http: aiohttp.ClientSession, server: ServerConfig, now: Callable[[], float]) -> Listing:
    """Ask the upstream what it offers. Raises ListingFailed (or aiohttp/OS errors, timeouts)."""
    session = _Session(http, server)
    init = await session.request(
        "initialize",
        {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "agentpay-portal", "version": "1"},
        },
    )
    capabilities = init.get("capabilities")
    caps: Mapping[str, Any] = capabilities if isinstance(capabilities, dict) else {}
    entries: list[Entry] = []
    try:
        await session.notify("notifications/initialized")
        if "tools" in caps:
            for item in await _pages(session, "tools/list", "tools"):
                entries.append(_entry("tool", item, "name"))
        if "resources" in caps:
            for item in await _pages(session, "resources/list", "resources"):
                entries.append(_entry("resource", item, "uri"))
            for item in await _pages(session, "resources/templates/list", "resourceTemplates"):
                entries.append(_entry("resource", item, "uriTemplate"))
        if "prompts" in caps:
            for item in await _pages(session, "prompts/list", "prompts"):
                entries.append(_entry("prompt", item, "name"))
    finally:
        await session.close()
    return Listing(server.name, tuple(e for e in entries if e.name), fetched_at=now())


def _entry(kind: str, item: dict[str, Any], key: str) -> Entry:
    return Entry(kind, _text(item.get(key), 300), _text(item.get("title"), 200), _text(item.get("description")))


@dataclass(slots=True)
class Listings:
    """The cache of every server's listing: fresh for ``ttl_s``, then refreshed in the background
    (the stale listing is shown meanwhile); a server never listed is asked at once, for at most
    ``timeout_s``."""

    config: GatewayConfig
    ttl_s: float = 60.0
    timeout_s: float = 5.0
    clock: Callable[[], float] = time.time
    _cache: dict[str, Listing] = field(default_factory=dict)
    _refreshing: dict[str, asyncio.Task[Listing]] = field(default_factory=dict)
    _http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        for task in list(self._refreshing.values()):
            task.cancel()
        await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        self._refreshing.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def get(self, server: str, *, refresh: bool = False) -> Listing:
        cached = self._cache.get(server)
        if cached is None or refresh:
            return await self._refresh(server)
        stamp = cached.fetched_at or 0.0
        if self.clock() - stamp >= self.ttl_s:
            self._start(server)  # stale: shown now, refreshed for the next look
        return cached

    async def current(self, server: str) -> Listing | None:
        """The listing once a refresh in flight (if any) has finished; None if never asked."""
        task = self._refreshing.get(server)
        if task is not None and not task.done():
            return await asyncio.shield(task)
        return self._cache.get(server)

    def _start(self, server: str) -> asyncio.Task[Listing]:
        task = self._refreshing.get(server)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._fetch(server))
            self._refreshing[server] = task
        return task

    async def _refresh(self, server: str) -> Listing:
        return await asyncio.shield(self._start(server))

    async def _fetch(self, server: str) -> Listing:
        config = self.config.servers[server]
        previous = self._cache.get(server)
        if config.upstream is None:
            listing = Listing(server, error="this server has no upstream to list (it charges through the SDK)")
            self._cache[server] = listing
            return listing
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with asyncio.timeout(self.timeout_s):
                listing = await list_server(self._http, config, self.clock)
        except (ListingFailed, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("portal_listing_failed", server=server, error=reason)
            # Keep what was listed before, marked unavailable, and try again at the next look.
            entries = previous.entries if previous is not None else ()
            listing = Listing(server, entries, fetched_at=None, error=reason)
        self._cache[server] = listing
        return listing
