"""The lean upstream client against raw HTTP servers: what it sends, keep-alive reuse, the connection
limit, stale connections, broken and malformed answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.proxy.upstream_client import UpstreamClient

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


class Server:
    """A raw HTTP server: ``answer(head, body)`` returns the bytes to write (None: close)."""

    def __init__(self, answer: Callable[[bytes, bytes], bytes | None]) -> None:
        self.answer = answer
        self.heads: list[bytes] = []
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.heads.append(head)
                out = self.answer(head, body)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serve(answer: Callable[[bytes, bytes], bytes | None]) -> AsyncIterator[tuple[str, Server]]:
    server = Server(answer)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/mcp", server
    finally:
        listener.close()
        for writer in server.writers:
            writer.close()  # each handler then reads the end of its stream and returns
        if server.tasks:
            await asyncio.wait(server.tasks, timeout=2)


def headers(**values: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in values.items()})


async def test_sends_host_accept_and_length_and_reuses_the_connection() -> None:
    async with serve(lambda head, body: OK) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        for _ in range(3):
            response = await client.request("POST", url + "?a=b c", data=b"{}", headers=headers(Content_Type="x/y"))
            assert (response.status, await response.read()) == (200, b"{}")
            response.release()
        await client.close()
    assert server.connections == 1
    head = server.heads[0].decode()
    assert head.startswith(f"POST {URL(url + '?a=b c').raw_path_qs} HTTP/1.1\r\n")  # encoded as aiohttp does
    assert f"\r\nHost: {url.split('/')[2]}\r\n" in head
    assert "\r\nAccept: */*\r\n" in head and "\r\nContent-Length: 2\r\n" in head
    assert "\r\nContent-Type: x/y\r\n" in head and "User-Agent" not in head and "Accept-Encoding" not in head


async def test_a_bodiless_delete_says_content_length_zero_and_a_get_does_not() -> None:
    async with serve(lambda head, body: OK) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        for method in ("DELETE", "GET"):
            response = await client.request(method, url, data=None, headers=headers(Accept="text/event-stream"))
            await response.read()
            response.release()
        await client.close()
    delete, get = (h.decode() for h in server.heads)
    assert "Content-Length: 0" in delete and "Content-Length" not in get
    assert "Accept: text/event-stream" in get and "*/*" not in get


async def test_a_connection_the_upstream_closes_is_not_reused() -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    async with serve(lambda head, body: closing) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        for _ in range(2):
            response = await client.request("POST", url, data=b"{}", headers=headers())
            assert await response.read() == b"{}"
            response.release()
        await client.close()
    assert server.connections == 2


async def test_an_answer_not_read_to_its_end_closes_its_connection() -> None:
    partial = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"
    async with serve(lambda head, body: partial) as (url, _):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        response = await client.request("POST", url, data=b"{}", headers=headers())
        response.release()
        with pytest.raises(aiohttp.ClientConnectionError):
            await response.read()
        assert client._open == 0
        await client.close()


async def test_the_connection_limit_queues_requests() -> None:
    async with serve(lambda head, body: OK) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=1)

        async def one() -> bytes:
            response = await client.request("POST", url, data=b"{}", headers=headers())
            try:
                return await response.read()
            finally:
                response.release()

        assert await asyncio.gather(*(one() for _ in range(5))) == [b"{}"] * 5
        await client.close()
    assert server.connections == 1


async def test_a_stale_kept_alive_connection_is_retried_for_get_only() -> None:
    async with serve(lambda head, body: OK) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        for method, retried in (("GET", True), ("POST", False)):
            response = await client.request(method, url, data=None, headers=headers())
            await response.read()
            response.release()
            proto = next(iter(client._all))
            server.answer = lambda head, body: None  # the next request on that connection: closed unanswered
            if retried:
                server.answer = _once_then(lambda head, body: None, lambda head, body: OK)
                response = await client.request(method, url, data=None, headers=headers())
                assert response.status == 200
                await response.read()
                response.release()
            else:
                with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
                    await client.request(method, url, data=b"{}", headers=headers())
            assert proto not in client._all
            server.answer = lambda head, body: OK
        await client.close()


def _once_then(
    first: Callable[[bytes, bytes], bytes | None], then: Callable[[bytes, bytes], bytes | None]
) -> Callable[[bytes, bytes], bytes | None]:
    calls = 0

    def answer(head: bytes, body: bytes) -> bytes | None:
        nonlocal calls
        calls += 1
        return first(head, body) if calls == 1 else then(head, body)

    return answer


async def test_a_malformed_answer_and_a_refused_connection_are_client_errors() -> None:
    async with serve(lambda head, body: b"NOT HTTP AT ALL\r\n\r\n") as (url, _):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        with pytest.raises(aiohttp.ClientResponseError):
            await client.request("POST", url, data=b"{}", headers=headers())
        assert client._open == 0
        await client.close()
    client = UpstreamClient(connect_timeout_s=5, max_connections=4)
    with pytest.raises(aiohttp.ClientConnectorError) as refused:
        await client.request("POST", url, data=b"{}", headers=headers())
    assert "Cannot connect to host 127.0.0.1" in str(refused.value)
    assert client._open == 0
    await client.close()


async def test_a_header_with_a_newline_is_refused_before_anything_is_sent() -> None:
    async with serve(lambda head, body: OK) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        with pytest.raises(ValueError):
            await client.request("POST", url, data=b"{}", headers=headers(X_Evil="a\r\nInjected: 1"))
        await client.close()
    assert server.heads == []


async def test_credentials_in_the_url_become_basic_auth() -> None:
    async with serve(lambda head, body: OK) as (url, server):
        client = UpstreamClient(connect_timeout_s=5, max_connections=4)
        response = await client.request(
            "POST", url.replace("http://", "http://user:pw@"), data=b"{}", headers=headers()
        )
        await response.read()
        response.release()
        await client.close()
    assert b"\r\nAuthorization: Basic dXNlcjpwdw==\r\n" in server.heads[0]
