"""The gateway's own HTTP server (``gateway.http_server``): requests aiohttp's parser refuses get a
fixed JSON 400 that quotes nothing they sent, and a client must deliver its request headers within
``client_header_timeout_s`` (slowloris on headers).

Raw HTTP over sockets, against the in-process gateway (``tests.harness``, which serves through
``GatewayRunner``) and against ``agentpay serve`` as a process."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod, BadStatusLine, InvalidHeader, LineTooLong

from gateway.api.operations import Operations
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.http_server import malformed_request_error, parser_reason
from gateway.ops.demo_upstream import DemoUpstream
from tests.fault_upstream import run_fault_upstream
from tests.harness import (
    FAULT_PRICES,
    Gateway,
    new_user,
    prepared_ledger,
    run_admin,
    run_gateway,
    tool_call,
    write_config,
)
from tests.process import free_port, run_gateway_process

BODY = json.dumps(tool_call("echo", {"message": "hi"})).encode()
DEADLINE = 0.3  # client_header_timeout_s in these tests
PATIENCE = 10.0  # how long a test waits for something that must happen


def head(key: str, *, close: bool = True) -> bytes:
    lines = [
        "POST /weather/mcp HTTP/1.1",
        "Host: gw",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {len(BODY)}",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def split_response(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    top, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, leaving the connection open."""
    async with asyncio.timeout(PATIENCE):
        top = await reader.readuntil(b"\r\n\r\n")
        status, headers, _ = split_response(top)
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


@asynccontextmanager
async def gateway(tmp_path: Path, **top: Any) -> AsyncIterator[tuple[Gateway, DemoUpstream, str]]:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES, **top)) as gw:
            key = await gw.new_user("alice", "100")
            yield gw, upstream, key


@asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


def port_of(gw: Gateway) -> int:
    assert gw.server.port is not None
    return gw.server.port


# --- parser errors ---------------------------------------------------------------------------------
MALFORMED_HEADERS = {
    "a bare CR after the key": lambda key: f"Authorization: Bearer {key}\r",
    "a NUL after the key": lambda key: f"Authorization: Bearer {key}\x00",
    "an obs-fold before the key": lambda key: f"Authorization: Bearer\r\n {key}",
    "a space before the colon": lambda key: f"Authorization : Bearer {key}",
    "a key as a header name": lambda key: f"{key}",
    "an admin-token-shaped secret with a bare CR": lambda key: f"Authorization: Bearer {key.removeprefix('ap_')}\r",
}


@pytest.mark.parametrize("case", list(MALFORMED_HEADERS))
async def test_a_request_the_parser_refuses_gets_a_fixed_json_400_that_quotes_nothing_it_sent(
    tmp_path: Path, case: str
) -> None:
    async with gateway(tmp_path) as (gw, upstream, key):
        line = MALFORMED_HEADERS[case](key)
        raw = f"POST /weather/mcp HTTP/1.1\r\nHost: gw\r\n{line}\r\nContent-Length: 0\r\n\r\n".encode()
        async with connection(port_of(gw)) as (reader, writer):
            writer.write(raw)
            async with asyncio.timeout(PATIENCE):
                answer = await reader.read()
        status, headers, body = split_response(answer)
        assert status == 400
        assert headers["content-type"].startswith("application/json")
        error = json.loads(body)["error"]
        assert error["code"] == "bad_request"
        assert error["message"].startswith("Malformed HTTP request")
        assert "Name: value" in error["hint"]
        assert key.removeprefix("ap_").encode() not in answer
        assert upstream.requests == []


@pytest.mark.parametrize(
    "exc",
    [
        BadHttpMessage("Invalid header value char:\n\n  b'Authorization: Bearer ap_SECRET\\x00'\n   ^"),
        BadStatusLine("SECRET"),
        BadStatusLine(error="Bad status line:\n  Invalid method:\n\n  b'SECRET'\n  ^"),
        BadHttpMethod("SECRET"),
        InvalidHeader(b"Authorization: Bearer SECRET"),
        LineTooLong(b"/k/SECRET/weather/mcp?aaaa...", 8190),
        BadHttpMessage("SECRET"),
        BadHttpMessage("Secret"),
        BadHttpMessage("Bearer SECRET"),
        BadHttpMessage("Authorization: Bearer SECRET"),
        BadHttpMessage("Duplicate 'SECRET' header found."),
    ],
    ids=repr,
)
def test_the_error_for_a_refused_request_never_carries_the_input(exc: BadHttpMessage) -> None:
    error = malformed_request_error(exc)
    text = json.dumps(error.to_json())
    assert "SECRET" not in text and "Secret" not in text
    assert error.http_status == 400 and error.code == "bad_request"


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (BadHttpMessage("Invalid header value char:\n\n  b'x'\n   ^"), "Invalid header value char"),
        (
            BadHttpMessage("Missing expected LF after header value:\n\n  b'x'\n  ^"),
            "Missing expected LF after header value",
        ),
        (BadHttpMessage("Too many headers received"), "Too many headers received"),
        (
            BadHttpMessage("Request has invalid `Transfer-Encoding`:\n\n  b''\n  ^"),
            "Request has invalid `Transfer-Encoding`",
        ),
        (BadHttpMethod(error="Received HTTPS traffic on an HTTP port"), "Received HTTPS traffic on an HTTP port"),
        (BadHttpMessage("Pause on CONNECT/Upgrade:\n\n  b''\n  ^"), "Pause on CONNECT/Upgrade"),
        (BadHttpMessage("Invalid character in Content-Length:\n\n  b'x'\n  ^"), "Invalid character in Content-Length"),
        (BadStatusLine(error="Bad status line:\n  Invalid method encountered:\n\n  b'x'\n  ^"), "Bad status line"),
    ],
)
def test_the_parsers_fixed_reason_is_kept_to_say_what_was_wrong(exc: BadHttpMessage, reason: str) -> None:
    assert parser_reason(exc) == reason
    assert malformed_request_error(exc).message == f"Malformed HTTP request: {reason}"


def test_an_overlong_line_is_reported_with_the_limit_not_the_line() -> None:
    error = malformed_request_error(LineTooLong(b"/k/ap_SECRET/x?aaaa...", 16384))
    assert "16384 bytes" in error.message and "SECRET" not in error.text()


# --- no Server banner ---------------------------------------------------------------------------------
async def test_no_response_on_either_listener_names_the_server_software(tmp_path: Path) -> None:
    """aiohttp's ``Server: Python/3.x aiohttp/3.y`` tells a scanner which CVEs to try: no response of the
    gateway or its admin listener carries a Server header (the upstream's is not relayed either)."""
    admin_token = "admin-" + "t" * 32
    requests = {
        "an MCP call": head(key="{key}") + BODY,
        "an invalid key": head(key="ap_" + "x" * 43) + BODY,
        "an unknown server": b"GET /nowhere/mcp HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "health": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "readiness": b"GET /readyz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "the service API without a token": b"GET /v1/charges HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "a request the parser refuses": b"POST /weather/mcp HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x00b\r\n\r\n",
    }
    admin_requests = {
        "admin health": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "admin without the token": b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
        "admin metrics": (
            f"GET /metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {admin_token}\r\nConnection: close\r\n\r\n"
        ).encode(),
        "admin, a request the parser refuses": b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Bad: a\x00b\r\n\r\n",
    }
    answers: dict[str, tuple[int, dict[str, str]]] = {}
    async with gateway(tmp_path) as (gw, _, key), run_admin(gw, admin_token) as admin:
        assert admin.port is not None
        for port, cases in ((port_of(gw), requests), (admin.port, admin_requests)):
            for case, raw in cases.items():
                async with connection(port) as (reader, writer):
                    writer.write(raw.replace(b"{key}", key.encode()))
                    async with asyncio.timeout(PATIENCE):
                        status, headers, _ = split_response(await reader.read())
                answers[case] = (status, headers)
    assert answers["an MCP call"][0] == 200 and answers["admin metrics"][0] == 200
    assert answers["a request the parser refuses"][0] == 400 == answers["admin, a request the parser refuses"][0]
    for case, (_, headers) in answers.items():
        assert "server" not in headers, f"{case}: Server: {headers.get('server')}"


# --- the request-header deadline ---------------------------------------------------------------------
async def trickle_until_closed(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    data: bytes,
    every: float = 0.05,
    *,
    stop_writing_after: float | None = DEADLINE * 0.6,
) -> bytes:
    """Send ``data`` one byte at a time, pacing by waiting ``every`` seconds on the socket for an
    answer; return everything the server sent once it closes the connection. Writing stops
    ``stop_writing_after`` seconds after the first byte (before the server's deadline), so that no
    byte is sent after the server has answered and closed: that byte would draw a reset, and a reset
    makes the stream reader drop the answer it had already received (a flaky failure under load)."""
    received = bytearray()
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(PATIENCE):
        for byte in data:
            if stop_writing_after is not None and loop.time() - started > stop_writing_after:
                break
            writer.write(bytes([byte]))
            try:
                chunk = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                continue
            if not chunk:
                return bytes(received)
            received += chunk
            break  # the server answered: stop writing (it closes after a 408) and read the rest
        while chunk := await reader.read(65536):
            received += chunk
    return bytes(received)


async def test_a_client_that_trickles_its_headers_gets_408_and_is_disconnected(tmp_path: Path) -> None:
    async with gateway(tmp_path, client_header_timeout_s=DEADLINE) as (gw, upstream, key):
        loop = asyncio.get_running_loop()
        async with connection(port_of(gw)) as (reader, writer):
            started = loop.time()
            answer = await trickle_until_closed(reader, writer, head(key) + BODY)
            elapsed = loop.time() - started
        assert DEADLINE <= elapsed < PATIENCE
        status, headers, body = split_response(answer)
        assert status == 408 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "client_too_slow" and "0.3s" in error["message"]
        assert upstream.requests == []
        await gw.verify_clean()


async def test_a_connection_that_sends_nothing_is_closed_silently_at_the_deadline(tmp_path: Path) -> None:
    async with gateway(tmp_path, client_header_timeout_s=DEADLINE) as (gw, _, _):
        loop = asyncio.get_running_loop()
        async with connection(port_of(gw)) as (reader, _):
            started = loop.time()
            async with asyncio.timeout(PATIENCE):
                assert await reader.read() == b""
            assert loop.time() - started >= DEADLINE


async def test_a_kept_alive_connection_may_idle_past_the_deadline_and_its_next_request_is_clocked(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, client_header_timeout_s=DEADLINE) as (gw, upstream, key):
        async with connection(port_of(gw)) as (reader, writer):
            writer.write(head(key, close=False) + BODY)
            status, _, _ = await read_response(reader)
            assert status == 200
            # Idle (no request under way) for longer than the header deadline: keepalive_timeout
            # governs idle connections, so nothing arrives and the connection stays open.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(1), 2 * DEADLINE)
            writer.write(head(key, close=False) + BODY)
            status, _, _ = await read_response(reader)
            assert status == 200
            # The next request's clock starts with its first byte.
            answer = await trickle_until_closed(reader, writer, head(key))
        assert split_response(answer)[0] == 408
        assert upstream.completed == ["echo", "echo"]


async def test_an_idle_kept_alive_connection_is_closed_after_client_idle_timeout_s(tmp_path: Path) -> None:
    async with gateway(tmp_path, client_idle_timeout_s=DEADLINE) as (gw, _, key):
        loop = asyncio.get_running_loop()
        async with connection(port_of(gw)) as (reader, writer):
            writer.write(head(key, close=False) + BODY)
            status, _, _ = await read_response(reader)
            assert status == 200
            idle_since = loop.time()
            async with asyncio.timeout(PATIENCE):
                assert await reader.read() == b""
            assert loop.time() - idle_since >= DEADLINE * 0.9


async def test_headers_sent_in_pieces_within_the_deadline_are_served(tmp_path: Path) -> None:
    async with gateway(tmp_path, client_header_timeout_s=5) as (gw, upstream, key):
        async with connection(port_of(gw)) as (reader, writer):
            answer = await trickle_until_closed(reader, writer, head(key) + BODY, every=0.001, stop_writing_after=None)
        assert split_response(answer)[0] == 200
        assert upstream.completed == ["echo"]


def test_the_header_deadline_is_a_positive_setting_defaulting_to_ten_seconds(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})).client_header_timeout_s == 10
    bad = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"}, client_header_timeout_s=0)
    with pytest.raises(ConfigError, match="client_header_timeout_s must be greater than 0"):
        load_config(bad)


# --- the same, through `agentpay serve` ------------------------------------------------------------
async def test_agentpay_serve_hardens_both_listeners_against_malformed_and_slow_requests(tmp_path: Path) -> None:
    admin_token = secrets.token_hex(24)  # not shaped like a key: the log redactor would not catch it
    admin_port = free_port()
    async with run_fault_upstream() as (url, upstream):
        config = write_config(
            tmp_path,
            {"weather": url},
            FAULT_PRICES,
            client_header_timeout_s=DEADLINE,
            admin_listen=f"127.0.0.1:{admin_port}",
            admin_token=admin_token,
        )
        async with prepared_ledger(config) as ledger:
            key = await new_user(Operations(ledger), "alice", "100")
        async with run_gateway_process(config) as gp:
            answers = []
            for port, secret in ((gp.port, key), (admin_port, admin_token)):
                raw = f"GET /v1/users HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\r\n\r\n".encode()
                async with connection(port) as (reader, writer):
                    writer.write(raw)
                    async with asyncio.timeout(PATIENCE):
                        answers.append(await reader.read())
            async with connection(gp.port) as (reader, writer):
                slow = await trickle_until_closed(reader, writer, head(key) + BODY)
            await gp.stop()
            logs = gp.logs()
    for answer in answers:
        status, _, body = split_response(answer)
        assert status == 400 and json.loads(body)["error"]["code"] == "bad_request"
    assert key.encode() not in b"".join(answers) and admin_token.encode() not in b"".join(answers)
    assert split_response(slow)[0] == 408
    assert key not in logs and admin_token not in logs
    assert '"error": "malformed_http"' in logs or '"error":"malformed_http"' in logs
    assert upstream.requests == []
