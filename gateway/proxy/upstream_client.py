"""A lean HTTP/1.1 client for upstreams: keep-alive connection pools on aiohttp's own response protocol.

Per request, aiohttp's ``ClientSession`` builds a request object, a payload object, a writer task, a
response object, timers and trace hooks: measured in front of a trivial upstream, about as much CPU
as everything else the gateway does for a free call. This client writes the request line, headers
and body with one write on a pooled connection, and reads the answer with aiohttp's
``ResponseHandler``: the same C parser, payload stream, flow control, decompression and error types
(``ServerDisconnectedError``, ``ClientPayloadError``, ``ClientOSError``), so an answer behaves as one
read through a ``ClientSession`` configured as ``gateway.proxy.headers.new_session`` was:

- sent: ``Host`` from the URL, the caller's headers, ``Accept: */*`` when there is none (no
  ``User-Agent``, no ``Accept-Encoding``), ``Content-Length`` (and ``application/octet-stream`` when
  a body has no ``Content-Type``), Basic credentials from the URL's user info; no cookies;
- read: status, headers and body as the upstream sent them (``Content-Encoding`` decoded), no
  redirects followed, a body without length read to the end of the connection;
- connections: at most ``max_connections`` open (0: no limit), idle ones reused for up to 15 s,
  a connection whose answer was not read to its end is closed; connecting is bounded by
  ``connect_timeout_s`` (``TimeoutError``); an idempotent request that fails on a reused connection
  before any answer is retried once on a new one (RFC 9112 §9.3.1), as aiohttp does;
- fair share: a request made for an API key (``key``) counts against that key's share of the
  connections, ``ceil(key_share * max_connections)`` requests at once, from the call until its answer
  has been read to its end or released (streams included). A key at its share waits its turn in its
  own queue (``gateway.proxy.fair_share``), not in the pool's, for up to ``queue_timeout_s``, then is
  refused with ``TooManyRequests``: one key cannot take every connection of a server.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from aiohttp import (
    BasicAuth,
    ClientConnectionError,
    ClientConnectorError,
    ClientOSError,
    ClientResponseError,
    InvalidURL,
    RequestInfo,
)
from aiohttp.client_exceptions import ServerDisconnectedError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.proxy.fair_share import FairShare, share_limit

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no "Content-Length: 0" when bodiless
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # given a default Content-Type
_KEEPALIVE_S = 15.0
_MAX_TARGETS = 1024
_READ_BUFSIZE = 2**16


@dataclass(frozen=True, slots=True)
class _Target:
    origin: tuple[str, str, int]  # scheme, host, port: the pool a connection belongs to
    host: str
    port: int
    tls: bool
    path: str  # the request target: " <path and query> HTTP/1.1\r\n"
    host_line: str  # "Host: …\r\n", unless the caller's headers name one
    credentials: str | None  # "Authorization: Basic …\r\n" from the URL's user info


class UpstreamAnswer(Protocol):
    """What the relay reads from an upstream: this module's ``UpstreamResponse``, or a stdio
    server's answer (``gateway.stdio``), which the gateway builds from its child's messages."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    content: StreamReader

    async def read(self) -> bytes: ...

    def release(self) -> None: ...


class Upstream(Protocol):
    """Where the proxy forwards a server's requests: ``UpstreamClient`` (HTTP) or ``StdioUpstream``."""

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
    ) -> UpstreamAnswer: ...

    async def close(self) -> None: ...


class UpstreamResponse:
    """The upstream's answer: ``status``, ``reason``, ``headers`` and ``content`` (a StreamReader)."""

    __slots__ = ("_client", "_done", "_key", "_proto", "content", "headers", "reason", "status")

    def __init__(
        self,
        client: UpstreamClient,
        proto: ResponseHandler,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        key: str | None = None,
    ) -> None:
        self._client = client
        self._proto = proto
        self._done = False
        self._key = key  # the API key whose fair share this answer counts against, until done
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content: StreamReader

    def _body_read(self) -> None:  # the payload's end of file: the connection is free again
        if not self._done:
            self._done = True
            if self._key is not None:
                self._client._share.release(self._key)
            self._client._release(self._proto)

    async def read(self) -> bytes:
        """The whole body."""
        return await self.content.read()

    def release(self) -> None:
        """Done with this answer. If its body was not read to its end, the connection is closed."""
        if self._done:
            return
        self._done = True
        if self._key is not None:
            self._client._share.release(self._key)
        if self.content.exception() is None:
            self.content.set_exception(ClientConnectionError("Connection closed"))
        self._client._discard(self._proto)


class UpstreamClient:
    """Pooled keep-alive connections to the upstreams of one server (any origin its URLs name)."""

    def __init__(self, *, connect_timeout_s: float, max_connections: int) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._limit = max_connections
        self._open = 0  # connections open or being opened, idle ones included
        self._idle: dict[tuple[str, str, int], list[tuple[ResponseHandler, float]]] = {}
        self._all: dict[ResponseHandler, tuple[str, str, int]] = {}  # every open connection -> its origin
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._targets: dict[str, _Target] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._share = FairShare()  # per API key: requests in flight and waiting for their turn

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
    ) -> UpstreamResponse:
        """Send a request; the answer's body is read from ``content``, then ``release()`` it.

        With a ``key`` (and a connection limit), the request counts against the key's share of the
        connections (``key_share``, a fraction of ``max_connections``) and waits up to
        ``queue_timeout_s`` for its turn (0: not at all); raises TooManyRequests when it did not come.
        """
        target = self._target(url)
        message = self._message(method, target, data, headers)
        if key is None or not self._limit:
            return await self._exchange(method, url, headers, target, message, None)
        limit = share_limit(key_share, self._limit)
        if not self._share.try_acquire(key, limit):  # at its share: wait for its turn
            await self._share.acquire(key, limit, queue_timeout_s, total=self._limit)
        try:
            return await self._exchange(method, url, headers, target, message, key)
        except BaseException:
            self._share.release(key)
            raise

    async def _exchange(
        self, method: str, url: str, headers: CIMultiDict[str], target: _Target, message: list[bytes], key: str | None
    ) -> UpstreamResponse:
        retry = method in _IDEMPOTENT
        while True:
            proto = self._idle_connection(target)
            reused = proto is not None
            if proto is None:
                proto, reused = await self._acquire(target)
            try:
                proto.set_response_params(
                    skip_payload=method == "HEAD",
                    read_until_eof=True,
                    auto_decompress=True,
                    read_bufsize=_READ_BUFSIZE,
                )
                transport = proto.transport
                if transport is None:
                    raise ServerDisconnectedError()
                try:
                    transport.writelines(message)
                except RuntimeError:  # uvloop: the transport closed under us (a kept-alive one the upstream dropped)
                    raise ServerDisconnectedError() from None
                while True:
                    head, payload = await proto.read()
                    if not 100 <= head.code <= 199 or head.code == 101:
                        break
            except (ClientOSError, ServerDisconnectedError):
                self._discard(proto)
                if reused and retry:
                    retry = False
                    continue
                raise
            except HttpProcessingError as exc:  # not HTTP: a ClientError, as aiohttp's ClientResponse says
                self._discard(proto)
                info = RequestInfo(URL(url), method, CIMultiDictProxy(CIMultiDict(headers)), URL(url))
                raise ClientResponseError(info, (), status=exc.code, message=exc.message, headers=exc.headers) from exc
            except BaseException:
                self._discard(proto)
                raise
            response = UpstreamResponse(self, proto, head.code, head.reason, head.headers, key)
            response.content = payload
            payload.on_eof(response._body_read)  # at once if the whole body has already arrived
            return response

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for proto in list(self._all):
            proto.close()
        self._all.clear()
        self._idle.clear()
        self._open = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ClientConnectionError("Upstream client closed"))
        self._share.close(ClientConnectionError("Upstream client closed"))

    # --- requests ----------------------------------------------------------------------------

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            target = self._targets[url] = _parse(url)
        return target

    @staticmethod
    def _message(method: str, target: _Target, data: bytes | None, headers: CIMultiDict[str]) -> list[bytes]:
        lines = [method, target.path]
        if "Host" not in headers:
            lines.append(target.host_line)
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise ValueError("Newline or carriage return character detected in HTTP status message or header")
            lines += (name, ": ", value, "\r\n")
        if target.credentials is not None and "Authorization" not in headers:
            lines.append(target.credentials)
        if "Accept" not in headers:
            lines.append("Accept: */*\r\n")
        if (data is not None or method in _BODY_METHODS) and "Content-Type" not in headers:
            lines.append("Content-Type: application/octet-stream\r\n")
        if data is not None:
            lines.append(f"Content-Length: {len(data)}\r\n\r\n")
            return ["".join(lines).encode(), data]
        if method not in _NO_BODY_METHODS:
            lines.append("Content-Length: 0\r\n")
        lines.append("\r\n")
        return ["".join(lines).encode()]

    # --- connections -------------------------------------------------------------------------

    def _idle_connection(self, target: _Target) -> ResponseHandler | None:
        """A kept-alive connection to the target's origin that can take a request, if there is one."""
        idle = self._idle.get(target.origin)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            proto, since = idle.pop()
            if now - since < _KEEPALIVE_S and proto.is_connected() and not proto.should_close:
                return proto
            self._close(proto)
        return None

    async def _acquire(self, target: _Target) -> tuple[ResponseHandler, bool]:
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ClientConnectionError("Upstream client closed")
            reusable = self._idle_connection(target)
            if reusable is not None:
                return reusable, True
            if not self._limit or self._open < self._limit:
                break
            if not self._close_an_idle_one():  # at the limit: make room, or wait for a connection
                waiter = loop.create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                except BaseException:
                    if waiter.done() and not waiter.cancelled():
                        self._wake()  # woken and cancelled at once: pass the wake-up on
                    raise
        self._open += 1
        try:
            proto = await self._connect(loop, target)
        except BaseException:
            self._open -= 1
            self._wake()
            raise
        self._all[proto] = target.origin
        return proto, False

    async def _connect(self, loop: asyncio.AbstractEventLoop, target: _Target) -> ResponseHandler:
        tls: ssl.SSLContext | None = None
        if target.tls:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: ResponseHandler(loop),
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                )
        except OSError as exc:
            key = ConnectionKey(target.host, target.port, target.tls, True, None, None, None, None)
            raise ClientConnectorError(key, exc) from exc
        return proto

    def _release(self, proto: ResponseHandler) -> None:
        """An answer was read to its end: keep the connection for the next request, if it can be."""
        origin = self._all.get(proto)
        if origin is None or self._closed or proto.should_close or not proto.is_connected():
            self._discard(proto)
            return
        loop = asyncio.get_running_loop()
        self._idle.setdefault(origin, []).append((proto, loop.time()))
        if self._sweeper is None:
            self._sweeper = loop.call_later(_KEEPALIVE_S, self._sweep_idle)
        self._wake()

    def _sweep_idle(self) -> None:
        """Close connections idle for the keep-alive time; runs while any connection is idle."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        limit = loop.time() - _KEEPALIVE_S
        for origin, idle in list(self._idle.items()):
            keep = [(proto, since) for proto, since in idle if since > limit and proto.is_connected()]
            for proto, since in idle:
                if since <= limit or not proto.is_connected():
                    self._close(proto)
            if keep:
                self._idle[origin] = keep
            else:
                del self._idle[origin]
        if self._idle:
            self._sweeper = loop.call_later(_KEEPALIVE_S, self._sweep_idle)

    def _discard(self, proto: ResponseHandler) -> None:
        if proto in self._all:
            self._close(proto)

    def _close(self, proto: ResponseHandler) -> None:
        proto.close()
        if self._all.pop(proto, None) is not None:
            self._open -= 1
        self._wake()

    def _close_an_idle_one(self) -> bool:
        for idle in self._idle.values():
            if idle:
                proto, _ = idle.pop(0)
                self._close(proto)
                return True
        return False

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def _parse(url: str) -> _Target:
    parsed = URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise InvalidURL(url)
    host = parsed.raw_host
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    credentials = None
    if parsed.raw_user or parsed.raw_password:
        credentials = f"Authorization: {BasicAuth(parsed.user or '', parsed.password or '').encode()}\r\n"
    return _Target(
        (parsed.scheme, host, port),
        host,
        port,
        parsed.scheme == "https",
        f" {parsed.raw_path_qs} HTTP/1.1\r\n",
        f"Host: {parsed.host_port_subcomponent}\r\n",
        credentials,
    )
