"""One child's stdio as MCP traffic: messages written to stdin as JSON lines, and every line of stdout
demultiplexed to the HTTP answer waiting for it.

Routing of the child's messages:
- a response goes to the stream waiting for its id (ids are the gateway's own, unique per request);
  with none waiting (the client went away), to the session's GET stream or its backlog, where a
  later GET finds it (so a parked call can still be delivered and billed);
- a progress notification goes to the POST whose request carried its progress token;
- any other notification or server-to-client request (sampling, elicitation, roots, logs) goes to
  the only POST in flight, else to the GET stream, else to the newest POST in flight, else to the
  backlog.

A shared child (stateless 2026-07-28 requests of any key) routes nothing but responses and progress,
whose tokens the gateway rewrote so that no key sees another's; everything else is dropped.

A child that writes a line that is not a JSON object or array, a line longer than ``max_body_bytes``,
or more undeliverable messages than the backlog holds is stopped; its waiting requests get an error
response (their holds are voided) and its session ends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from gateway.errors import UPSTREAM_FAILED
from gateway.stdio.answer import RequestId, Stream
from gateway.stdio.process import Child, LineTooLong

log = structlog.get_logger("gateway.stdio")

BACKLOG_MESSAGES = 1000  # undeliverable messages kept for a later GET stream
_PROGRESS = "notifications/progress"


class Channel:
    """The traffic of one child: a session's own, or shared by stateless requests."""

    def __init__(
        self,
        child: Child,
        *,
        shared: bool,
        stall_timeout_s: float,
        backlog_bytes: int,
        on_end: Callable[[Channel], None],
    ) -> None:
        self.child = child
        self.shared = shared
        self.waiting: dict[RequestId, Stream] = {}
        self.progress: dict[Any, Stream] = {}
        self.posts: list[Stream] = []
        self.get: Stream | None = None
        self.backlog: deque[bytes] = deque()
        self.last_active = time.monotonic()
        self.ended = False
        self.why = ""
        self._backlog_size = 0
        self._backlog_bytes = backlog_bytes
        self._stall_timeout_s = stall_timeout_s
        self._token_seq = 0
        self._on_end = on_end
        self._reader = asyncio.ensure_future(self._read_forever())

    # --- requests ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """A response is awaited: the child is not idle, whatever the clock says."""
        return any(stream.open for stream in self.waiting.values())

    def open_post(self, messages: list[dict[str, Any]]) -> Stream:
        """A stream for the responses to the requests among ``messages`` (ids as sent to the child)."""
        ids = [m["id"] for m in messages if "method" in m and "id" in m]
        stream = Stream(ids)
        for request_id in ids:
            self.waiting[request_id] = stream
        for message in messages:
            token = _progress_token(message)
            if token is None:
                continue
            if self.shared:  # the child sees a token of the gateway's, unique among its clients
                self._token_seq += 1
                ours = f"ap.{self._token_seq}"
                message["params"]["_meta"]["progressToken"] = ours
                stream.tokens[ours] = token
                token = ours
            self.progress[token] = stream
        self.posts.append(stream)
        self.last_active = time.monotonic()
        return stream

    def open_get(self) -> Stream | None:
        """The session's GET stream, with what waited for it; None when one is open already."""
        if self.get is not None and self.get.open:
            return None
        stream = self.get = Stream((), sse_now=True)
        while self.backlog:
            stream.deliver(self.backlog.popleft())
        self._backlog_size = 0
        self.last_active = time.monotonic()
        return stream

    def close_stream(self, stream: Stream) -> None:
        """The HTTP answer is done (or its client gone): later messages for it go elsewhere."""
        stream.finish()
        for request_id in [i for i, s in self.waiting.items() if s is stream]:
            if self.shared:
                del self.waiting[request_id]  # nobody else may receive it
            # In a session the id stays: its late response goes to the GET stream or the backlog.
        for token in [t for t, s in self.progress.items() if s is stream]:
            del self.progress[token]
        if stream in self.posts:
            self.posts.remove(stream)
        if stream is self.get:
            self.get = None
        self.last_active = time.monotonic()

    async def send(self, messages: list[dict[str, Any]]) -> None:
        """Write messages to the child's stdin, one JSON line each. ConnectionError when it is gone."""
        if self.ended:
            raise ConnectionResetError(self.why or "the stdio server has stopped")
        lines = b"".join(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for m in messages)
        self.last_active = time.monotonic()
        await self.child.write(lines)

    # --- the child's output -----------------------------------------------------------------

    async def _read_forever(self) -> None:
        why = "its stdout ended"
        try:
            while True:
                line = await self.child.read_line()
                if line is None:
                    break
                self.last_active = time.monotonic()
                problem = self._route_line(line)
                if problem:
                    why = problem
                    break
                for stream in self._paused():
                    try:
                        async with asyncio.timeout(self._stall_timeout_s):
                            await stream.flow.resumed.wait()
                    except TimeoutError:
                        why = "a client did not read its stream"
                        break
                else:
                    continue
                break
        except LineTooLong as exc:
            why = f"it wrote {exc}"
        except (ConnectionError, OSError) as exc:
            why = f"its stdout failed ({type(exc).__name__})"
        self.end(why)

    def _paused(self) -> list[Stream]:
        streams = [s for s in self.posts if s.paused]
        if self.get is not None and self.get.paused:
            streams.append(self.get)
        return streams

    def _route_line(self, line: bytes) -> str | None:
        """Send one line to where it belongs; the reason to stop the child, if it misbehaved."""
        try:
            value = json.loads(line)
        except ValueError:
            return "it wrote a line that is not JSON"
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(item, dict) for item in items):
            return "it wrote JSON that is not a JSON-RPC message"
        for item in items:
            raw = line if len(items) == 1 else json.dumps(item, ensure_ascii=False).encode()
            problem = self._route(item, raw)
            if problem:
                return problem
        return None

    def _route(self, item: dict[str, Any], raw: bytes) -> str | None:
        if "method" not in item:  # a response
            response_id = item.get("id")
            if isinstance(response_id, (str, int)):
                stream = self.waiting.pop(response_id, None)
                if stream is not None and stream.open:
                    stream.deliver(raw, response_id)
                    return None
            return None if self.shared else self._undelivered(raw, keep=True)
        if item["method"] == _PROGRESS:
            params = item.get("params")
            token = params.get("progressToken") if isinstance(params, dict) else None
            stream = self.progress.get(token) if isinstance(token, (str, int)) else None
            if stream is not None and stream.open:
                if token in stream.tokens and isinstance(params, dict):
                    item["params"] = {**params, "progressToken": stream.tokens[token]}
                    raw = json.dumps(item, ensure_ascii=False).encode()
                stream.deliver(raw)
                return None
        if self.shared:
            return None  # nobody's in particular: a shared child's other messages are dropped
        open_posts = [s for s in self.posts if s.open and s.ids]
        if len(open_posts) == 1:
            open_posts[0].deliver(raw)
        elif self.get is not None and self.get.open:
            self.get.deliver(raw)
        elif open_posts:
            open_posts[-1].deliver(raw)
        else:
            return self._undelivered(raw, keep="id" in item)
        return None

    def _undelivered(self, raw: bytes, *, keep: bool) -> str | None:
        """Keep a message for a later GET stream; notifications are dropped when the backlog is full,
        responses and requests never: a child that fills it with them is stopped."""
        if self.get is not None and self.get.open:
            self.get.deliver(raw)
            return None
        if len(self.backlog) >= BACKLOG_MESSAGES or self._backlog_size + len(raw) > self._backlog_bytes:
            return "it sent more undeliverable messages than the backlog holds" if keep else None
        self.backlog.append(raw)
        self._backlog_size += len(raw)
        return None

    def end(self, why: str) -> None:
        """The child is gone or misbehaved: every awaited response becomes an error, every stream ends."""
        if self.ended:
            return
        self.ended = True
        self.why = why
        exit_status = self.child.proc.returncode
        for request_id, stream in list(self.waiting.items()):
            if stream.open:
                stream.deliver(_exited(request_id, self.child.server, why, exit_status), request_id)
        self.waiting.clear()
        for stream in [*self.posts, *([self.get] if self.get is not None else [])]:
            stream.finish()
        self.posts.clear()
        self.progress.clear()
        if self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._on_end(self)


def _progress_token(message: dict[str, Any]) -> Any:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    token = meta.get("progressToken") if isinstance(meta, dict) else None
    return token if isinstance(token, (str, int)) and "id" in message else None


def _exited(request_id: RequestId, server: str, why: str, exit_status: int | None) -> bytes:
    status = f"; exit status {exit_status}" if exit_status is not None else ""
    body = {
        "jsonrpc": "2.0",
        "id": request_id,
        "error": {
            "code": UPSTREAM_FAILED,
            "message": f"The stdio server {server!r} stopped before answering ({why}{status}); nothing was charged",
            "data": {"code": "stdio_server_stopped", "hint": "Start a new session (initialize) and call again"},
        },
    }
    return json.dumps(body).encode()
