"""Hostile input through a real gateway: secrets never leak, path/Host tricks never reach another
server, bad Origins and oversized headers are refused cleanly.

Requests that aiohttp's client would normalise (dot-segments, encoded slashes, absolute-form
targets, duplicate Host headers, malformed header lines) are written as raw HTTP/1.1 over a socket.
Two fault upstreams stand behind the gateway, ``weather`` and ``maps``; every attack uses a key for
``weather`` and must leave ``maps``' upstream untouched.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.api.operations import Operations
from gateway.money import parse_cents
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
from tests.process import run_gateway_process

PRICES = {"weather": FAULT_PRICES["weather"], "maps": FAULT_PRICES["weather"]}
HOSTS = {"weather": {"hosts": ["weather.example.com"]}, "maps": {"hosts": ["maps.example.com"]}}
BODY = json.dumps(tool_call("echo", {"message": "hi"})).encode()
PRICED = json.dumps(tool_call("get_forecast", {"city": "x"})).encode()
# aiohttp's access log (logger "aiohttp.access") prints the raw request line, path-embedded keys
# included. The test server enables it; `agentpay serve` and `agentpay demo` build their runners
# with access_log=None, which test_keys_never_reach_the_logs_of_a_real_gateway_process checks.
TEST_ONLY_LOGGERS = frozenset({"aiohttp.access"})
CRASH = b"500 Internal Server Error"  # aiohttp's page for an exception the gateway did not map
ADMIN_TOKEN = "admin-token-" + "a" * 32


@dataclass
class Setup:
    gw: Gateway
    weather: DemoUpstream
    maps: DemoUpstream
    key: str  # alice's key for weather
    maps_key: str  # bob's key for maps

    @property
    def port(self) -> int:
        port = self.gw.server.port
        assert port is not None
        return port


@asynccontextmanager
async def two_servers(tmp_path: Path, **top: Any) -> AsyncIterator[Setup]:
    async with run_fault_upstream() as (weather_url, weather), run_fault_upstream() as (maps_url, maps):
        config = write_config(tmp_path, {"weather": weather_url, "maps": maps_url}, PRICES, server_options=HOSTS, **top)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100", server="weather")
            maps_key = await gw.new_user("bob", "100", server="maps")
            yield Setup(gw, weather, maps, key, maps_key)


def http(
    target: str,
    headers: list[tuple[str, str]] | None = None,
    *,
    method: str = "POST",
    body: bytes = BODY,
    host: str | None = "gw",
) -> bytes:
    """One raw HTTP/1.1 request, exactly as written (no normalisation)."""
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines += [f"{name}: {value}" for name, value in headers or []]
    lines += [
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def send_raw(port: int, data: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the whole answer; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2, f"no HTTP answer: {answer[:200]!r}"
    return int(status_line[1]), body


def log_text(records: list[logging.LogRecord]) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in records if r.name not in TEST_ONLY_LOGGERS)


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


# --- secrets -------------------------------------------------------------------------------------
async def test_a_key_never_appears_in_logs_metrics_error_bodies_or_upstream_requests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = "ap_" + secrets.token_urlsafe(32)
    bad_other = "sk-" + secrets.token_urlsafe(24)  # not even shaped like an AgentPay key
    seen: list[bytes] = []
    async with two_servers(tmp_path, max_body_bytes=4096) as s:
        key, maps_key = s.key, s.maps_key
        requests = [
            http("/weather/mcp", bearer(key)),  # 200
            http("/weather/mcp", [("X-API-Key", key)], body=PRICED),  # 200, charged
            http(f"/k/{key}/weather/mcp", body=PRICED),  # 200, key in the path
            http(f"/k/{key}/weather/mcp", method="GET", body=b""),  # the upstream's 405, relayed
            http(f"/k/{key}/weather/mcp?x=1", method="DELETE", body=b""),
            http("/mcp", bearer(key), host="weather.example.com"),  # host-routed
            http("/weather/mcp", bearer(bad)),  # 401 invalid key
            http("/weather/mcp", [("X-API-Key", bad)]),
            http(f"/k/{bad}/weather/mcp"),
            http("/weather/mcp", bearer(bad_other)),
            http("/weather/mcp", [("Authorization", f"Basic {key}")]),  # wrong scheme: 401 missing key
            http("/weather/mcp", bearer(maps_key)),  # 403 wrong server
            http(f"/k/{key}/maps/mcp"),
            http("/weather/mcp", bearer(key), body=b'{"jsonrpc": "2.0", "method": '),  # 400 parse error
            http("/weather/mcp", [*bearer(key), ("Mcp-Method", "tools/list")], body=PRICED),  # 400 -32020
            http("/weather/mcp", [*bearer(key), ("Origin", "https://evil.example")]),  # 403 origin
            http("/weather/mcp", bearer(key), body=b"[" + b"1," * 3000 + b"1]"),  # 413
            http(f"/k/{key}/weather/sse", method="POST"),  # the SSE endpoint takes GET
            http(f"/k/{key}/weather/messages?channel=nope"),  # 404: unknown legacy channel
            http(f"/k/{key}/weather/nothing"),  # 404
            http("/weather/mcp", bearer(key), body=json.dumps(tool_call("fail_500")).encode()),  # upstream 500
            http("/weather/mcp", bearer(key), body=json.dumps(tool_call("garbage")).encode()),
            http("/weather/mcp", bearer(key), body=json.dumps(tool_call("reset")).encode()),  # 502
            http("/v1/keys/validate", bearer(key), body=json.dumps({"key": key}).encode()),  # not a service token
            http("/v1/charges", bearer(bad), body=b"{}"),
            http("/.well-known/oauth-authorization-server", bearer(key), method="GET", body=b""),
        ]
        caplog.set_level(logging.DEBUG)
        with capture_logs() as structured:
            for request in requests:
                status, body = await send_raw(s.port, request)
                seen.append(body)
                assert not body.startswith(CRASH), (status, body[:300])
            await s.gw.settled()
            async with (
                run_admin(s.gw, ADMIN_TOKEN) as admin,
                aiohttp.ClientSession() as client,
                client.get(admin.make_url("/metrics"), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp,
            ):
                assert resp.status == 200
                seen.append(await resp.read())
        assert await s.gw.balance("alice") == parse_cents("90")  # the two priced calls, nothing else
        places = {
            "response bodies": b"\n".join(seen).decode("utf-8", "replace"),
            "structlog": json.dumps(structured, default=str),
            "stdlib logging": log_text(caplog.records),
            "weather upstream": json.dumps(s.weather.requests, default=str),
            "maps upstream": json.dumps(s.maps.requests, default=str),
        }
        assert len(s.weather.requests) >= 5 and s.maps.requests == []
        assert any(entry.get("path") == "/k/<redacted>/weather/mcp" for entry in structured)
        for secret in (key, maps_key, bad, bad_other):
            for where, text in places.items():
                assert secret not in text, f"a key leaked into {where}"
        for forwarded in s.weather.requests:
            assert not {"authorization", "x-api-key"} & {h.lower() for h in forwarded["headers"]}


async def test_keys_never_reach_the_logs_of_a_real_gateway_process(tmp_path: Path) -> None:
    """``agentpay serve`` as a process, JSON logs on: scan everything it printed."""
    bad = "ap_" + secrets.token_urlsafe(32)
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES)
        async with prepared_ledger(config) as ledger:
            key = await new_user(Operations(ledger), "alice", "100")
        async with run_gateway_process(config) as gp:
            for request in (
                http(f"/k/{key}/weather/mcp", body=PRICED),
                http("/weather/mcp", bearer(key)),
                http("/weather/mcp", [("X-API-Key", key)], body=b"{"),
                http(f"/k/{bad}/weather/mcp"),
                http("/weather/mcp", bearer(bad)),
                http(f"/k/{key}/weather/mcp", [("Origin", "https://evil.example")]),
            ):
                await send_raw(gp.port, request)
            await gp.stop()
            logs = gp.logs()
        assert '"path": "/k/<redacted>/weather/mcp"' in logs or '"path":"/k/<redacted>/weather/mcp"' in logs
        assert key not in logs and bad not in logs
        assert upstream.completed == ["get_forecast", "echo"]


@pytest.mark.parametrize("template", ["//k/{key}/weather/mcp", "/k//{key}/weather/mcp", "/{key}/mcp"])
async def test_a_key_in_a_mistyped_path_is_never_logged_or_echoed(tmp_path: Path, template: str) -> None:
    async with two_servers(tmp_path) as s:
        with capture_logs() as structured:
            status, body = await send_raw(s.port, http(template.format(key=s.key)))
        assert status == 404
        assert s.key not in json.dumps(structured, default=str)
        assert s.key.encode() not in body


@pytest.mark.parametrize(
    "template",
    [
        "/ap%5F{rest}/mcp",  # the underscore encoded
        "/%61%70%5f{rest}/mcp",  # the whole prefix, lower-case hex
        "/ap%255F{rest}/mcp",  # encoded twice
        "/k/ap%5F{rest}/nowhere/mcp",  # a path key before an unknown server
        "/k//ap%5F{rest}/weather/mcp",
        "//k/ap%5F{rest}/weather/mcp",
        "/weather-ap%5F{rest}/mcp",
    ],
)
async def test_a_percent_encoded_key_in_a_path_is_never_logged_or_echoed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, template: str
) -> None:
    async with two_servers(tmp_path) as s:
        rest = s.key.removeprefix("ap_")
        caplog.set_level(logging.DEBUG)
        with capture_logs() as structured:
            status, body = await send_raw(s.port, http(template.format(rest=rest)))
        assert status in (401, 404)
        assert rest not in json.dumps(structured, default=str)
        assert rest not in log_text(caplog.records)
        assert rest.encode() not in body
        assert s.weather.requests == [] and s.maps.requests == []


@pytest.mark.parametrize(
    "case",
    [
        "bare CR",
        "NUL",
        "obs-fold",
        "space before colon",
        "request line over max_header_bytes with a path key",
        "long query after path key, refused by the upstream",
    ],
)
async def test_a_malformed_request_never_echoes_or_logs_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    async with two_servers(tmp_path) as s:
        key = s.key
        raw = {
            "bare CR": http("/weather/mcp", [("Authorization", f"Bearer {key}\r")]),
            "NUL": http("/weather/mcp", [("Authorization", f"Bearer {key}\x00")]),
            "obs-fold": http("/weather/mcp", [("Authorization", f"Bearer\r\n {key}")]),
            "space before colon": http("/weather/mcp", [("Authorization ", f"Bearer {key}")]),
            # over the gateway's max_header_bytes (16384): its parser refuses, quoting the line's start
            "request line over max_header_bytes with a path key": http(f"/k/{key}/weather/mcp?" + "a" * 17_000),
            # within the gateway's limit, over the upstream's (aiohttp's 8190): the gateway forwards the
            # query (never the path) and relays the upstream's 400
            "long query after path key, refused by the upstream": http(f"/k/{key}/weather/mcp?" + "a" * 9000),
        }[case]
        caplog.set_level(logging.DEBUG)
        status, body = await send_raw(s.port, raw)
        assert status == 400
        if "upstream" not in case:
            error = json.loads(body)["error"]  # gateway.http_server's fixed body, not aiohttp's echo
            assert error["code"] == "bad_request" and error["message"].startswith("Malformed HTTP request")
            assert s.weather.requests == []
        assert key.encode() not in body
        assert key not in log_text(caplog.records)


# --- routing tricks ------------------------------------------------------------------------------
KEY = "{key}"  # replaced by the weather key of the test
TRICKS: list[tuple[str, str, list[tuple[str, str]], str | None, set[int]]] = [
    # (case, request-target, extra headers, Host, acceptable statuses)
    ("dot-segment", "/weather/../maps/mcp", [], "gw", {400}),
    ("dot-segments after the endpoint", "/weather/mcp/../../maps/mcp", [], "gw", {400}),
    ("single dot", "/./maps/mcp", [], "gw", {400}),
    ("encoded dot-segment", "/weather/%2e%2e/maps/mcp", [], "gw", {400}),
    ("upper-case encoded dot-segment", "/weather/%2E%2E/maps/mcp", [], "gw", {400}),
    ("half-encoded dot-segment", "/weather/.%2e/maps/mcp", [], "gw", {400}),
    ("encoded slash", "/weather%2F..%2Fmaps/mcp", [], "gw", {400}),
    ("encoded slash in the server segment", "/maps%2fmcp", [], "gw", {400}),
    ("backslash", "/weather\\..\\maps/mcp", [], "gw", {400}),
    ("encoded backslash", "/weather%5c..%5cmaps/mcp", [], "gw", {400}),
    ("dot-segment after a path key", f"/k/{KEY}/../maps/mcp", [], "gw", {400}),
    ("encoded dot-segment after a path key", f"/k/{KEY}/%2e%2e/maps/mcp", [], "gw", {400}),
    ("double-encoded slash", "/weather%252f..%252fmaps/mcp", [], "gw", {404}),
    ("empty first segment", "//maps/mcp", [], "gw", {404}),
    ("percent-encoded server name", "/%6daps/mcp", [], "gw", {404}),
    ("upper-case server name", "/MAPS/mcp", [], "gw", {404}),
    ("matrix parameter", "/maps;/mcp", [], "gw", {404}),
    ("path key for the other server", f"/k/{KEY}/maps/mcp", [], "gw", {403}),
    ("Host of the other server", "/mcp", [], "maps.example.com", {403}),
    ("Host of the other server, mixed case and a port", "/mcp", [], "MAPS.Example.com:8080", {403}),
    ("Host of the other server with a trailing dot", "/mcp", [], "maps.example.com.", {403, 404}),
    ("own Host, other server's path", "/maps/mcp", [], "weather.example.com", {404}),
    ("duplicate Host, other first", "/mcp", [("Host", "weather.example.com")], "maps.example.com", {400}),
    ("duplicate Host, own first", "/mcp", [("Host", "maps.example.com")], "weather.example.com", {400}),
    ("two hosts in one Host header", "/mcp", [], "weather.example.com, maps.example.com", {400, 404}),
    ("userinfo in Host", "/mcp", [], "weather.example.com@maps.example.com", {400, 404}),
    ("absolute-form naming the other server's path", "http://maps.example.com/maps/mcp", [], "gw", {403}),
    # RFC 9112 says an absolute-form authority overrides Host; the gateway routes by Host. Either way
    # the key is bound to weather, so maps is unreachable: 200 from weather or 403 are both safe.
    (
        "absolute-form naming the other server's host",
        "http://maps.example.com/mcp",
        [],
        "weather.example.com",
        {200, 403},
    ),
    (
        "X-Forwarded-Host of the other server",
        "/mcp",
        [("X-Forwarded-Host", "maps.example.com")],
        "weather.example.com",
        {200},
    ),
    (
        "X-Original-URL of the other server",
        "/weather/mcp",
        [("X-Original-URL", "/maps/mcp"), ("X-Rewrite-URL", "/maps/mcp")],
        "gw",
        {200},
    ),
]


@pytest.mark.parametrize(("case", "target", "headers", "host", "statuses"), TRICKS, ids=[t[0] for t in TRICKS])
async def test_path_and_host_tricks_cannot_reach_another_server(
    tmp_path: Path, case: str, target: str, headers: list[tuple[str, str]], host: str | None, statuses: set[int]
) -> None:
    async with two_servers(tmp_path) as s:
        extra = [(name, value.format(key=s.key)) for name, value in headers]
        status, body = await send_raw(s.port, http(target.format(key=s.key), [*bearer(s.key), *extra], host=host))
        assert status in statuses, (case, status, body[:300])
        assert s.maps.requests == [], f"{case}: reached the maps upstream"
        assert len(s.weather.requests) == (1 if status == 200 else 0)
        assert s.key.encode() not in body
        await s.gw.verify_clean()


# --- Origin --------------------------------------------------------------------------------------
BAD_ORIGINS = [
    "https://evil.example",
    "null",
    "http://localhost.evil.example",
    "http://127.0.0.1.evil.example",
    "https://weather.example.com.evil.example",
    "https://maps.example.com",  # another server's host is not this server's origin
    "file://",
    "",
]


@pytest.mark.parametrize("origin", BAD_ORIGINS)
async def test_a_bad_origin_is_refused_before_the_upstream(tmp_path: Path, origin: str) -> None:
    async with two_servers(tmp_path, allowed_origins=["https://app.example.com"]) as s:
        status, body = await send_raw(s.port, http("/weather/mcp", [*bearer(s.key), ("Origin", origin)]))
        assert status == 403
        assert json.loads(body)["error"]["data"]["code"] == "origin_forbidden"
        assert s.weather.requests == []


@pytest.mark.parametrize(
    "origin",
    ["https://app.example.com", "HTTPS://APP.EXAMPLE.COM/", "http://localhost:3000", "https://weather.example.com"],
)
async def test_an_allowed_origin_passes(tmp_path: Path, origin: str) -> None:
    async with two_servers(tmp_path, allowed_origins=["https://app.example.com"]) as s:
        status, _ = await send_raw(s.port, http("/weather/mcp", [*bearer(s.key), ("Origin", origin)]))
        assert status == 200


@pytest.mark.parametrize("origin", ["http://[::1", "http://[evil.example]"])
async def test_a_malformed_origin_is_refused_with_403(tmp_path: Path, origin: str) -> None:
    async with two_servers(tmp_path) as s:
        status, _ = await send_raw(s.port, http("/weather/mcp", [*bearer(s.key), ("Origin", origin)]))
        assert status == 403


# --- sizes and malformed input ----------------------------------------------------------------
OVERSIZED = {
    "one 20 KB header": lambda key: http("/weather/mcp", [*bearer(key), ("X-Fill", "a" * 20_000)]),
    "a 20 KB request line": lambda key: http("/weather/mcp?" + "a" * 20_000, bearer(key)),
    "a 20 KB bearer token": lambda key: http("/weather/mcp", bearer("ap_" + "b" * 20_000)),
    "5000 headers": lambda key: http("/weather/mcp", [*bearer(key), *((f"X-H{i}", "v") for i in range(5000))]),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
async def test_oversized_headers_are_refused_cleanly_and_the_gateway_keeps_serving(tmp_path: Path, case: str) -> None:
    async with two_servers(tmp_path) as s:
        status, _ = await send_raw(s.port, OVERSIZED[case](s.key))
        assert status in (400, 413, 414, 431)
        assert s.weather.requests == []
        status, _ = await send_raw(s.port, http("/weather/mcp", bearer(s.key)))
        assert status == 200


async def test_the_configured_max_header_bytes_is_enforced(tmp_path: Path) -> None:
    async with two_servers(tmp_path, max_header_bytes=2048) as s:
        status, _ = await send_raw(s.port, http("/weather/mcp", [*bearer(s.key), ("X-Fill", "a" * 4000)]))
        assert status in (400, 431)
        assert s.weather.requests == []


MALFORMED: dict[str, tuple[Callable[[str], bytes], int, str]] = {
    "a non-UTF-8 Authorization header": (
        lambda key: http("/weather/mcp", [("Authorization", "Bearer ap_\udcff\udcfe")]),
        401,
        "hash_secret() encodes the surrogate-escaped header with 'utf-8' and raises UnicodeEncodeError",
    ),
    "a deeply nested JSON body": (
        lambda key: http("/weather/mcp", bearer(key), body=b"[" * 50_000),
        400,
        "json.loads raises RecursionError, which parse_body does not catch",
    ),
    "a lone surrogate id with a mismatching Mcp-Method": (
        lambda key: http(
            "/weather/mcp",
            [*bearer(key), ("Mcp-Method", "tools/list")],
            body=b'{"jsonrpc":"2.0","id":"\\ud800","method":"tools/call","params":{"name":"echo"}}',
        ),
        400,
        "error_response -> jsonrpc.dumps encodes the id with 'utf-8' and raises UnicodeEncodeError",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_input_is_a_clear_4xx_not_a_500(tmp_path: Path, case: str) -> None:
    build, expected, _ = MALFORMED[case]
    async with two_servers(tmp_path) as s:
        status, body = await send_raw(s.port, build(s.key))
        assert status == expected, body[:200]
        assert s.weather.requests == []
        await s.gw.verify_clean()


def _framed(key: str, framing: bytes, payload: bytes) -> bytes:
    head = (
        f"POST /weather/mcp HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: application/json\r\nAccept: application/json\r\nConnection: close\r\n"
    ).encode()
    return head + framing + b"\r\n" + payload


def _smuggled(key: str) -> bytes:
    """A second, priced request hidden after the first one's body."""
    return (
        f"POST /weather/mcp HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(PRICED)}\r\n\r\n"
    ).encode() + PRICED


CHUNKED = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
SMUGGLING = {
    "Content-Length and Transfer-Encoding": b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    "Transfer-Encoding and Content-Length": b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
    "two Content-Lengths": f"Content-Length: {len(CHUNKED)}\r\nContent-Length: 4\r\n".encode(),
    "an unknown transfer coding": b"Transfer-Encoding: xchunked\r\n",
    "chunked not last": b"Transfer-Encoding: chunked, identity\r\n",
    "a signed Content-Length": f"Content-Length: +{len(CHUNKED)}\r\n".encode(),
}


@pytest.mark.parametrize("case", list(SMUGGLING))
async def test_ambiguous_framing_is_refused_and_smuggles_nothing(tmp_path: Path, case: str) -> None:
    async with two_servers(tmp_path) as s:
        status, _ = await send_raw(s.port, _framed(s.key, SMUGGLING[case], CHUNKED + _smuggled(s.key)))
        assert status == 400
        await asyncio.sleep(0.1)  # a smuggled request would be forwarded right after the first
        assert s.weather.requests == [] and s.weather.completed == []
        await s.gw.verify_clean()
        assert await s.gw.balance("alice") == parse_cents("100")


@pytest.mark.parametrize(
    "target",
    ["/.well-known/oauth-authorization-server", "/.well-known/oauth-protected-resource/weather/mcp", "/register"],
)
async def test_oauth_discovery_is_not_offered(tmp_path: Path, target: str) -> None:
    """Clients that discover OAuth metadata stop sending the configured key header (and would send a
    registration elsewhere): those paths are a plain 404, with or without a key."""
    async with two_servers(tmp_path) as s:
        for method in ("GET", "POST"):
            status, body = await send_raw(s.port, http(target, bearer(s.key), method=method))
            assert status == 404 and s.key.encode() not in body
        assert s.weather.requests == []
