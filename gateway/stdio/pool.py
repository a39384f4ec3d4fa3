"""A stdio MCP server as an upstream: the gateway runs the server's command and answers the proxy's
Streamable HTTP requests for it, so admission, ids, relay and billing are the HTTP upstreams' own.

- ``initialize`` (a POST without a session) takes a warm child or starts one: the session is the
  child's, and its id (``<owner>.<random>``) names the gateway process that runs it. The proxy
  signs it to the caller's key, as it does an HTTP upstream's session id.
- A session's POSTs and its GET stream are the child's traffic (``gateway.stdio.channel``); its
  DELETE, ``idle_timeout_s`` without traffic, the child's exit, or the gateway's drain stop the child
  (SIGTERM, then SIGKILL after ``stop_grace_s``) and end the session: its next request gets a 404.
- A session id of another gateway process (another worker or replica) gets a 404 that says so:
  load balancers need affinity on ``Mcp-Session-Id`` for stdio servers.
- Stateless (2026-07-28) requests share up to ``warm_processes`` children, started on first use.
- ``max_processes`` counts every child (sessions, warm, shared, starting): at it, a new session is
  refused with a 503. One API key may hold ``ceil(max_key_share * max_processes)`` sessions: past that,
  its least recently used idle session ends to make room, and with none idle the new one gets a 503.
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import time
from typing import Any

import structlog
from multidict import CIMultiDict

from gateway.config import ServerConfig, StdioConfig
from gateway.errors import INVALID_REQUEST, UPSTREAM_FAILED
from gateway.stdio import answer
from gateway.stdio.answer import JSON_HEADERS, SSE_HEADERS, Answer, Stream
from gateway.stdio.channel import Channel
from gateway.stdio.process import Child

log = structlog.get_logger("gateway.stdio")

MODERN = "2026-07-28"
SESSION_NOT_FOUND = -32001  # the JSON-RPC code of the proxy's own "Session not found"
_SESSION_GONE = "Start a new session (initialize)"


class StdioUpstream:
    """The children of one stdio server, behind the interface of an HTTP upstream client."""

    def __init__(self, server: ServerConfig, *, max_line: int, owner: str | None = None) -> None:
        assert server.stdio is not None
        self.server = server.name
        self.config: StdioConfig = server.stdio
        self.owner = owner or secrets.token_hex(4)  # this gateway process, in the session ids it mints
        self._max_line = max_line
        self.sessions: dict[str, Channel] = {}
        self._keys: dict[str, str] = {}  # session id -> the API key that opened it (its share of max_processes)
        self.shared: list[Channel] = []
        self.spares: list[Child] = []
        self.children: set[Child] = set()
        self._starting = 0
        self._next_shared = 0
        self._shared_lock = asyncio.Lock()  # the first shared child is started once
        self._growing = False  # a further shared child is being started
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.closed = False

    # --- the upstream interface ---------------------------------------------------------------

    async def request(
        self,
        method: str,
        url: str,
        *,
        data: bytes | None,
        headers: CIMultiDict[str],
        key: str | None = None,
        key_share: float = 0.5,
        queue_timeout_s: float = 10.0,
    ) -> Answer:
        """Answer one request of the proxy as the server's Streamable HTTP endpoint would.
        (The HTTP client's fair-share arguments do not apply: each session has its own child.)"""
        if self.closed:
            return answer.error(503, UPSTREAM_FAILED, "The gateway is shutting down", "unavailable", "Retry shortly")
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap_forever())
        session_id = headers.get("Mcp-Session-Id")
        if method == "POST":
            return await self._post(session_id, data or b"", headers, key, key_share)
        if method in ("GET", "DELETE"):
            if session_id is None:
                return answer.error(
                    400, INVALID_REQUEST, "This request needs an Mcp-Session-Id header", "bad_request", _SESSION_GONE
                )
            channel = self._session(session_id)
            if isinstance(channel, Answer):
                return channel
            if method == "DELETE":
                self._end_session(session_id, "the client ended the session (DELETE)")
                return answer.fixed(200)
            stream = channel.open_get()
            if stream is None:
                return answer.error(
                    409, INVALID_REQUEST, "This session already has a GET stream open", "conflict",
                    "Close the other stream first",
                )  # fmt: skip
            return Answer(200, SSE_HEADERS, stream.content, on_release=lambda: channel.close_stream(stream))
        return answer.error(
            405, INVALID_REQUEST, f"Method {method} is not supported", "method_not_allowed", "Use POST, GET or DELETE"
        )

    async def close(self) -> None:
        """Drain: stop every child (SIGTERM, SIGKILL after the grace) and wait until they are gone."""
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for session_id in list(self.sessions):
            self._end_session(session_id, "the gateway is draining")
        for channel in list(self.shared):
            channel.end("the gateway is draining")
        for child in list(self.children):
            self._stop(child, "the gateway is draining")
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- POST -------------------------------------------------------------------------------

    async def _post(
        self, session_id: str | None, data: bytes, headers: CIMultiDict[str], key: str | None, key_share: float
    ) -> Answer:
        try:
            value = json.loads(data)
        except ValueError:
            return answer.error(400, INVALID_REQUEST, "The body is not JSON", "parse_error", "Send JSON-RPC")
        messages: list[dict[str, Any]] = [
            m for m in (value if isinstance(value, list) else [value]) if isinstance(m, dict)
        ]
        requests = [m for m in messages if "method" in m and "id" in m]
        if session_id is not None:
            channel = self._session(session_id)
            if isinstance(channel, Answer):
                return channel
            return await self._exchange(channel, messages, requests)
        if any(m.get("method") == "initialize" for m in requests):
            if key is not None and not self._within_share(key, key_share):
                return answer.error(
                    503, UPSTREAM_FAILED,
                    f"This API key already has {math.ceil(key_share * self.config.max_processes)} sessions of "
                    f"server {self.server!r} in calls, its share of the server's {self.config.max_processes} "
                    "stdio processes",
                    "stdio_key_share",
                    "Wait for a call to end, or end a session you no longer need (DELETE)",
                )  # fmt: skip
            return await self._initialize(messages, requests, key)
        if _is_modern(messages, headers):
            if not requests:
                return answer.fixed(202)  # 2026-07-28 defines no client notifications here
            channel_or_refusal = await self._shared_channel()
            if isinstance(channel_or_refusal, Answer):
                return channel_or_refusal
            return await self._exchange(channel_or_refusal, messages, requests)
        return answer.error(
            400, INVALID_REQUEST, "This request needs an Mcp-Session-Id header", "bad_request", _SESSION_GONE
        )

    def _within_share(self, key: str, key_share: float) -> bool:
        """Whether the key may open one more session: below its share of ``max_processes``, or at it
        with an idle session of its own, which then ends (its least recently used) to make room."""
        if not self.spares and self._count() >= self.config.max_processes:
            return True  # the server is full: that refusal (stdio_capacity) says more
        own = [sid for sid, owner in self._keys.items() if owner == key]
        if len(own) < math.ceil(key_share * self.config.max_processes):
            return True
        idle = [sid for sid in own if sid in self.sessions and not self.sessions[sid].busy]
        if not idle:
            return False
        oldest = min(idle, key=lambda sid: self.sessions[sid].last_active)
        log.info("stdio_session_evicted", server=self.server, session=oldest[:16], why="its key opened another")
        self._end_session(oldest, "its key opened another session at its share of max_processes")
        return True

    async def _initialize(
        self, messages: list[dict[str, Any]], requests: list[dict[str, Any]], key: str | None
    ) -> Answer:
        child = await self._take_child()
        if isinstance(child, Answer):
            return child
        session_id = f"{self.owner}.{secrets.token_urlsafe(18)}"
        child.session_tag = session_id[:16]
        channel = self._channel(child, shared=False)
        self.sessions[session_id] = channel
        if key is not None:
            self._keys[session_id] = key
        self._warm_up()
        log.info("stdio_session", server=self.server, pid=child.pid, session=child.session_tag)
        return await self._exchange(channel, messages, requests, session_id=session_id)

    async def _exchange(
        self,
        channel: Channel,
        messages: list[dict[str, Any]],
        requests: list[dict[str, Any]],
        *,
        session_id: str | None = None,
    ) -> Answer:
        """Write the messages to the child and answer with what comes back for its requests."""
        extra = (("Mcp-Session-Id", session_id),) if session_id is not None else ()
        stream: Stream | None = channel.open_post(messages) if requests else None
        try:
            await channel.send(messages)
        except (ConnectionError, OSError):
            if stream is not None:
                channel.close_stream(stream)
            channel.end("its stdin is closed")
            return answer.error(
                404, SESSION_NOT_FOUND, "Session not found: its stdio server has stopped", "session_not_found",
                _SESSION_GONE,
            )  # fmt: skip
        if stream is None:
            return answer.fixed(202)
        try:
            sse = await stream.decided
        except BaseException:  # the proxy's deadline, or its client went away
            channel.close_stream(stream)
            raise
        headers = (*(SSE_HEADERS if sse else JSON_HEADERS), *extra)
        return Answer(200, headers, stream.content, on_release=lambda: channel.close_stream(stream))

    # --- sessions and children ------------------------------------------------------------------

    def _session(self, session_id: str) -> Channel | Answer:
        channel = self.sessions.get(session_id)
        if channel is not None and not channel.ended:
            return channel
        owner = session_id.split(".", 1)[0]
        if owner != self.owner:
            return answer.error(
                404, SESSION_NOT_FOUND,
                f"Session not found here: it belongs to another gateway process (the stdio server {self.server!r} "
                "runs one process per session, in the gateway process that started it)",
                "session_not_found",
                "Send every request of a session to the same gateway replica (session affinity on Mcp-Session-Id), "
                "or start a new session (initialize)",
            )  # fmt: skip
        return answer.error(
            404, SESSION_NOT_FOUND,
            "Session not found: its stdio server process has ended (DELETE, idle timeout, exit or gateway restart)",
            "session_not_found", _SESSION_GONE,
        )  # fmt: skip

    def _channel(self, child: Child, *, shared: bool) -> Channel:
        return Channel(
            child,
            shared=shared,
            stall_timeout_s=self.config.idle_timeout_s,
            backlog_bytes=self._max_line * 4,
            on_end=self._channel_ended,
        )

    def _channel_ended(self, channel: Channel) -> None:
        for session_id, other in list(self.sessions.items()):
            if other is channel:
                del self.sessions[session_id]
                self._keys.pop(session_id, None)
        if channel in self.shared:
            self.shared.remove(channel)
        if channel.why not in ("", "the gateway is draining") and not channel.why.startswith("the client"):
            log.warning("stdio_ended", server=self.server, pid=channel.child.pid, why=channel.why)
        self._stop(channel.child, channel.why)

    def _end_session(self, session_id: str, why: str) -> None:
        channel = self.sessions.pop(session_id, None)
        self._keys.pop(session_id, None)
        if channel is not None:
            channel.end(why)

    def process_count(self) -> int:
        """Children running or starting (what ``max_processes`` bounds)."""
        return len(self.children) + self._starting

    _count = process_count

    def session_count(self) -> int:
        return len(self.sessions)

    async def _take_child(self) -> Child | Answer:
        """A warm child, or a new one; a 503 answer at max_processes, a 502 one if it cannot start."""
        while self.spares:
            child = self.spares.pop()
            if child.alive:
                return child
            self._stop(child, "it exited while warm")
        if self._count() >= self.config.max_processes:
            log.warning("stdio_capacity", server=self.server, max_processes=self.config.max_processes)
            return answer.error(
                503, UPSTREAM_FAILED,
                f"Server {self.server!r} is running its maximum of {self.config.max_processes} stdio processes "
                "(max_processes), so no new session can start now",
                "stdio_capacity",
                "Retry when other sessions have ended (DELETE a session you no longer need); the operator can "
                "raise max_processes",
            )  # fmt: skip
        return await self._start_child()

    async def _start_child(self) -> Child | Answer:
        self._starting += 1
        try:
            child = await Child.start(self.server, self.config, max_line=self._max_line)
        except OSError as exc:
            log.error("stdio_start_failed", server=self.server, command=self.config.command[0], error=str(exc))
            return answer.error(
                502, UPSTREAM_FAILED,
                f"The stdio server {self.server!r} could not be started ({exc.strerror or type(exc).__name__})",
                "stdio_start_failed", "Nothing was charged; tell the gateway operator",
            )  # fmt: skip
        finally:
            self._starting -= 1
        self.children.add(child)
        if self.closed:
            self._stop(child, "the gateway is draining")
        return child

    def _warm_up(self) -> None:
        """Start a spare child in the background, for the next session not to wait for a start."""
        if len(self.spares) + self._starting >= self.config.warm_processes or self.closed:
            return
        if self._count() >= self.config.max_processes:
            return
        self._spawn(self._add_spare())

    async def _add_spare(self) -> None:
        child = await self._start_child()
        if isinstance(child, Child):
            if self.closed:
                return
            self.spares.append(child)

    async def _shared_channel(self) -> Channel | Answer:
        """A child for stateless requests. The first is started while the request waits (once, however
        many requests wait for it); more, up to ``warm_processes``, in the background."""
        self.shared = [c for c in self.shared if not c.ended]
        if not self.shared:
            async with self._shared_lock:
                self.shared = [c for c in self.shared if not c.ended]
                if not self.shared:
                    made = await self._new_shared()
                    if isinstance(made, Answer):
                        return made
        elif (
            len(self.shared) < self.config.warm_processes
            and not self._growing
            and self._count() < self.config.max_processes
        ):
            self._growing = True
            self._spawn(self._grow_shared())
        self._next_shared = (self._next_shared + 1) % len(self.shared)
        return self.shared[self._next_shared]

    async def _new_shared(self) -> Channel | Answer:
        child = await self._take_child()
        if isinstance(child, Answer):
            return child
        child.session_tag = "stateless"
        channel = self._channel(child, shared=True)
        self.shared.append(channel)
        return channel

    async def _grow_shared(self) -> None:
        try:
            await self._new_shared()
        finally:
            self._growing = False

    def _stop(self, child: Child, why: str) -> None:
        if child in self.children:
            self.children.discard(child)
            self._spawn(child.stop(self.config.stop_grace_s, why=why))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reap_forever(self) -> None:
        """Stop children idle for ``idle_timeout_s``, and notice the ones that exited on their own."""
        idle_s = self.config.idle_timeout_s
        interval = min(max(idle_s / 4, 0.05), 15.0)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session_id, channel in list(self.sessions.items()):
                if not channel.busy and now - channel.last_active >= idle_s:
                    self._end_session(session_id, f"idle for {idle_s:g}s")
            for channel in list(self.shared):
                if not channel.busy and now - channel.last_active >= idle_s:
                    channel.end(f"idle for {idle_s:g}s")
            for child in list(self.spares):
                if not child.alive or now - child.started >= idle_s:
                    self.spares.remove(child)
                    self._stop(child, f"warm and unused for {idle_s:g}s")


def _is_modern(messages: list[dict[str, Any]], headers: CIMultiDict[str]) -> bool:
    """Whether these are 2026-07-28 (stateless) requests: they carry the version in ``_meta`` or header."""
    version: Any = headers.get("MCP-Protocol-Version")
    for message in messages:
        params = message.get("params")
        meta = params.get("_meta") if isinstance(params, dict) else None
        if isinstance(meta, dict) and isinstance(meta.get("io.modelcontextprotocol/protocolVersion"), str):
            version = meta["io.modelcontextprotocol/protocolVersion"]
    return isinstance(version, str) and version >= MODERN
