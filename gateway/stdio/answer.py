"""What the gateway's relay reads from a stdio server, shaped as an HTTP upstream's answer: status,
headers and a body stream (aiohttp's own ``StreamReader``, fed by the channel) — so the proxy's
relay, billing and withholding work on it exactly as on an HTTP upstream's.

A ``Stream`` is one answer being built from the child's messages: a POST's, which is JSON when its
only response comes first and SSE as soon as anything else comes first (progress, a log message, a
server-to-client request), or a session's GET stream (SSE). Its flow control pauses the channel's
reading of the child's stdout while the client does not read: a slow client slows only its own child.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.protocol import sse

RequestId = str | int
_BUFFER = 2**16
JSON_HEADERS = (("Content-Type", "application/json"),)
SSE_HEADERS = (("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"))


class _Flow(BaseProtocol):
    """The reader's flow control: paused while the stream holds more than it should."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.resumed = asyncio.Event()
        self.resumed.set()

    @property
    def connected(self) -> bool:  # no transport, yet never "closed": the stream ends with feed_eof
        return True

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.resumed.clear()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        self.resumed.set()


class Stream:
    """One answer being built from the child's messages."""

    def __init__(self, ids: Iterable[RequestId], *, sse_now: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.ids: set[RequestId] = set(ids)  # responses still awaited on this stream
        self.flow = _Flow(loop)
        self.content = StreamReader(self.flow, _BUFFER, loop=loop)
        self.decided: asyncio.Future[bool] = loop.create_future()  # True: SSE, False: one JSON body
        self.tokens: dict[Any, Any] = {}  # progress tokens sent -> the client's own (stateless children)
        self.open = True
        if sse_now:
            self.decided.set_result(True)

    @property
    def sse(self) -> bool:
        return self.decided.done() and self.decided.result()

    def deliver(self, raw: bytes, response_id: RequestId | None = None) -> None:
        """Add one message of the child; ``response_id`` when it is a response to one of ``ids``."""
        if not self.open:
            return
        if response_id is not None:
            self.ids.discard(response_id)
        if not self.decided.done():
            if response_id is not None and not self.ids:  # its only response, before anything else
                self.decided.set_result(False)
                self.content.feed_data(raw)
                self.finish()
                return
            self.decided.set_result(True)
        self.content.feed_data(sse.encode(raw.decode("utf-8", "replace"), event="message"))
        if response_id is not None and not self.ids:
            self.finish()

    def finish(self) -> None:
        if self.open:
            self.open = False
            self.content.feed_eof()
            if not self.decided.done():
                self.decided.set_result(True)
            self.flow.resume_reading()

    @property
    def paused(self) -> bool:
        return self.open and not self.flow.resumed.is_set()


class Answer:
    """An HTTP-like answer (what ``gateway.proxy.relay`` reads from an upstream)."""

    __slots__ = ("_on_release", "content", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        content: StreamReader,
        *,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.reason = _REASONS.get(status, "")
        self.headers = CIMultiDictProxy(CIMultiDict(headers))
        self.content = content
        self._on_release = on_release

    async def read(self) -> bytes:
        return await self.content.read()

    def release(self) -> None:
        on_release, self._on_release = self._on_release, None
        if on_release is not None:
            on_release()


_REASONS = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def fixed(status: int, body: bytes = b"", headers: Iterable[tuple[str, str]] = JSON_HEADERS) -> Answer:
    """An answer whose whole body is known now."""
    content = StreamReader(_Flow(asyncio.get_running_loop()), _BUFFER, loop=asyncio.get_running_loop())
    if body:
        content.feed_data(body)
    content.feed_eof()
    return Answer(status, headers if body else (), content)


def error(status: int, jsonrpc_code: int, message: str, code: str, hint: str) -> Answer:
    """A JSON-RPC error answer, as an MCP server's transport gives one (id null)."""
    body = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": jsonrpc_code, "message": f"{message}. {hint}", "data": {"code": code, "hint": hint}},
    }
    return fixed(status, json.dumps(body).encode())
