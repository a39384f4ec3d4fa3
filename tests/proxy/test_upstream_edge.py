"""The gateway as an edge in front of upstreams: forwarded headers, secrets, redirects, fees, request
bodies in a Content-Encoding."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, run_admin, run_gateway, tool_call, write_config

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PATIENCE = 10.0  # how long a test waits for an answer


def raw_request(key: str, body: bytes, headers: list[tuple[str, str]], *, host: str = "gw") -> bytes:
    """A POST to /weather/mcp exactly as written; header values may carry surrogate-escaped raw bytes."""
    lines = [
        "POST /weather/mcp HTTP/1.1",
        f"Host: {host}",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        "Accept: application/json, text/event-stream",
        *(f"{name}: {value}" for name, value in headers),
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


async def send_raw(port: int | None, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Raw bytes in, the whole answer out: (status, headers with lower-cased names, body)."""
    assert port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(PATIENCE):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@asynccontextmanager
async def recording_upstream(response_headers: dict[str, str]) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """An MCP upstream that answers every call with a text result and ``response_headers``, recording
    the headers of each request it gets (lower-cased names)."""
    seen: list[dict[str, str]] = []

    async def mcp(request: web.Request) -> web.Response:
        seen.append({name.lower(): value for name, value in request.headers.items()})
        call = await request.json()
        result = {"content": [{"type": "text", "text": "ok"}]}
        return web.json_response({"jsonrpc": "2.0", "id": call["id"], "result": result}, headers=response_headers)

    app = web.Application()
    app.router.add_post("/mcp", mcp)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("/mcp")), seen
    finally:
        await server.close()


async def test_forwarded_headers_are_added_and_only_trusted_proxies_are_believed(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(
            tmp_path,
            {"weather": url},
            FAULT_PRICES,
            trusted_proxies=["10.0.0.0/8"],
            server_options={"weather": {"upstream_headers": {"X-Upstream-Secret": "s3cret"}}},
        )
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            spoof = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil"}
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(),
                    json=tool_call("echo", {"message": "x"}),
                    headers={**HEADERS, **spoof, "Authorization": f"Bearer {key}"},
                ) as resp,
            ):
                assert resp.status == 200
            seen = upstream.requests[0]["headers"]
            assert seen["X-Forwarded-For"] == "127.0.0.1"  # the spoofed chain is dropped: 127.0.0.1 is not trusted
            assert seen["X-Forwarded-Proto"] == "http"
            assert seen["X-Forwarded-Host"] != "evil"
            assert seen["X-Upstream-Secret"] == "s3cret"
            assert seen["Host"].startswith("127.0.0.1:")  # the upstream's own Host


async def test_a_trusted_proxy_chain_is_kept(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, trusted_proxies=["127.0.0.0/8"])
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(),
                    json=tool_call("echo", {"message": "x"}),
                    headers={
                        **HEADERS,
                        "X-Forwarded-For": "203.0.113.9",
                        "X-Forwarded-Proto": "https",
                        "Authorization": f"Bearer {key}",
                    },
                ),
            ):
                pass
            seen = upstream.requests[0]["headers"]
            assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
            assert seen["X-Forwarded-Proto"] == "https"


async def test_upstream_redirects_are_relayed_never_followed(tmp_path: Path) -> None:
    followed: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    async def elsewhere(request: web.Request) -> web.Response:
        followed.append(request.path)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/mcp", redirect)
    app.router.add_post("/elsewhere", elsewhere)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        async with run_gateway(write_config(tmp_path, {"weather": str(server.make_url("/mcp"))}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(),
                    data=json.dumps(tool_call("get_forecast")),
                    headers={**HEADERS, "Authorization": f"Bearer {key}"},
                    allow_redirects=False,
                ) as resp,
            ):
                assert resp.status == 307 and resp.headers["Location"] == "/elsewhere"
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")
        assert followed == []
    finally:
        await server.close()


async def test_a_platform_fee_is_split_in_the_same_transfer_as_the_charge(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _):
        config = write_config(
            tmp_path, {"weather": url}, FAULT_PRICES, server_options={"weather": {"platform_fee_percent": "20"}}
        )
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(), json=tool_call("get_forecast"), headers={**HEADERS, "Authorization": f"Bearer {key}"}
                ) as resp,
            ):
                receipt = (await resp.json())["result"]["_meta"]["io.agentpay/receipt"]
            await gw.verify_clean()
            assert receipt["amount_cents"] == "5"
            assert await gw.balance("alice") == parse_cents("95")
            assert await gw.earnings() == parse_cents("4")
            charge = await gw.ledger.get_charge(receipt["charge_id"])
            assert (charge.amount, charge.fee) == (parse_cents("5"), parse_cents("1"))


# --- headers a client must not be able to set for the upstream ----------------------------------
SPOOFABLE = {
    "X-Real-IP": "6.6.6.6",
    "True-Client-IP": "6.6.6.6",
    "X-Client-IP": "6.6.6.6",
    "X-Cluster-Client-IP": "6.6.6.6",
    "CF-Connecting-IP": "6.6.6.6",
    "Fastly-Client-IP": "6.6.6.6",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
}


async def test_client_identity_and_url_rewrite_headers_a_client_could_forge_never_reach_the_upstream(
    tmp_path: Path,
) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(),
                    json=tool_call("echo", {"message": "x"}),
                    headers={**HEADERS, **SPOOFABLE, "Authorization": f"Bearer {key}"},
                ) as resp,
            ):
                assert resp.status == 200
    seen = {name.lower(): value for name, value in upstream.requests[0]["headers"].items()}
    assert not {name.lower() for name in SPOOFABLE} & seen.keys()
    assert "6.6.6.6" not in json.dumps(seen)
    assert seen["x-forwarded-for"] == "127.0.0.1"  # who the caller is, as the gateway saw it


async def test_headers_named_in_a_connection_header_are_dropped_in_both_directions(tmp_path: Path) -> None:
    upstream_says = {"Connection": "keep-alive, X-Upstream-Hop", "X-Upstream-Hop": "internal", "X-Kept": "1"}
    async with recording_upstream(upstream_says) as (url, seen):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            request = raw_request(
                key,
                json.dumps(tool_call("echo", {"message": "x"})).encode(),
                [("Connection", "X-Client-Hop, Keep-Alive"), ("X-Client-Hop", "hop"), ("X-Client-End", "e2e")],
            )
            status, headers, _ = await send_raw(gw.server.port, request)
    assert status == 200
    # RFC 9110 §7.6.1: the options a Connection header lists are for this hop only
    assert "x-client-hop" not in seen[0] and seen[0]["x-client-end"] == "e2e"
    assert "x-upstream-hop" not in headers and headers["x-kept"] == "1"


# --- header values aiohttp could only keep as surrogate escapes ----------------------------------
@pytest.mark.parametrize(
    ("header", "host"),
    [(("X-Note", "caf\udce9"), "gw"), (("User-Agent", "agent/\udcff\udcfe"), "gw"), (None, "gw\udce9.example")],
    ids=["latin-1 byte in a custom header", "invalid UTF-8 in User-Agent", "latin-1 byte in Host"],
)
async def test_a_forwarded_header_with_bytes_that_are_not_utf8_is_a_400_json_rpc_error_that_charges_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, header: tuple[str, str] | None, host: str
) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            priced = json.dumps(tool_call("get_forecast", {"city": "x"}, rid=7)).encode()
            caplog.set_level(logging.INFO)
            status, headers, body = await send_raw(
                gw.server.port, raw_request(key, priced, [header] if header else [], host=host)
            )
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")
    assert status == 400 and headers["content-type"] == "application/json"
    error = json.loads(body)
    assert error["jsonrpc"] == "2.0" and error["id"] == 7
    assert error["error"]["code"] == -32600 and error["error"]["data"]["code"] == "bad_request"
    assert "not UTF-8" in error["error"]["message"]
    assert upstream.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback, no 500


# --- request bodies in a Content-Encoding ----------------------------------------------------------
async def test_a_gzip_body_is_priced_and_forwarded_decompressed_without_its_content_encoding(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            body = gzip.compress(json.dumps(tool_call("get_forecast", {"city": "Oslo"})).encode())
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(),
                    data=body,
                    headers={**HEADERS, "Content-Encoding": "gzip", "Authorization": f"Bearer {key}"},
                ) as resp,
            ):
                assert resp.status == 200
                answer = await resp.json()
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("95")
    assert answer["result"]["_meta"]["io.agentpay/receipt"]["amount_cents"] == "5"
    forwarded = {name.lower() for name in upstream.requests[0]["headers"]}
    assert "content-encoding" not in forwarded
    assert upstream.completed == ["get_forecast"]


async def test_a_body_that_is_not_valid_gzip_is_a_400_saying_so_on_every_listener(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_gzip = b"this is not gzip at all"
    admin_token = "admin-" + "t" * 32
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            service_token = (await gw.ops.create_token(developer="acme", servers=["weather"]))["token"]
            caplog.set_level(logging.INFO)
            answers: dict[str, tuple[int, Any]] = {}
            async with run_admin(gw, admin_token) as admin, aiohttp.ClientSession() as http:
                for where, target, token in (
                    ("mcp", gw.url(), key),
                    ("service api", str(gw.server.make_url("/v1/charges")), service_token),
                    ("admin api", str(admin.make_url("/v1/users")), admin_token),
                    ("refused before the body is read", gw.url(), "ap_" + "x" * 43),
                ):
                    headers = {**HEADERS, "Content-Encoding": "gzip", "Authorization": f"Bearer {token}"}
                    async with http.post(target, data=not_gzip, headers={**headers, "Idempotency-Key": "k1"}) as resp:
                        answers[where] = (resp.status, await resp.json())
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")
    message = "The request body is not valid gzip data (Content-Encoding: gzip)"
    status, mcp = answers["mcp"]
    assert status == 400 and mcp["error"]["code"] == -32600 and mcp["error"]["data"]["code"] == "bad_request"
    assert mcp["error"]["message"].startswith(message)
    for where in ("service api", "admin api"):  # the HTTP APIs' own error shape
        status, api = answers[where]
        assert status == 400 and api["error"]["code"] == "bad_request", where
        assert api["error"]["message"] == message, where
    assert answers["refused before the body is read"][0] == 401
    assert upstream.requests == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback, no 500


async def test_the_body_size_limit_applies_to_the_decompressed_body(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, max_body_bytes=65536)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            padded = tool_call("echo", {"message": "a" * 1_000_000})
            bomb = gzip.compress(json.dumps(padded).encode())
            assert len(bomb) < 65536
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    gw.url(),
                    data=bomb,
                    headers={**HEADERS, "Content-Encoding": "gzip", "Authorization": f"Bearer {key}"},
                ) as resp,
            ):
                assert resp.status == 413
    assert upstream.requests == []


@asynccontextmanager
async def oversized_upstream(size: int) -> AsyncIterator[str]:
    """Answers ``tools/call`` of ``big`` with a JSON result of about ``size`` bytes: with a
    Content-Length for ``big``, chunked (no length) for ``big_chunked``; any other tool briefly."""

    async def post(request: web.Request) -> web.StreamResponse:
        message = await request.json()
        name = message.get("params", {}).get("name")
        text = "x" * size if name in ("big", "big_chunked") else "small"
        result = {"content": [{"type": "text", "text": text}]}
        body = json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result})
        if name != "big_chunked":
            return web.Response(body=body.encode(), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = body.encode()
        for start in range(0, len(data), 4096):
            await response.write(data[start : start + 4096])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/mcp", post)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("/mcp"))
    finally:
        await server.close()


@pytest.mark.parametrize("tool", ["big", "big_chunked"])
async def test_an_answer_over_four_times_max_body_bytes_is_a_502_and_nothing_is_charged(
    tmp_path: Path, tool: str
) -> None:
    """Before, a JSON answer was read whole with only a time bound: an upstream's endless or huge
    answer could fill the gateway's memory. Now it is refused past four times max_body_bytes (as one SSE event)."""
    async with oversized_upstream(200_000) as url:
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, max_body_bytes=16_384)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
            key = await gw.new_user("alice", "100")
            headers = {**HEADERS, "Authorization": f"Bearer {key}"}

            async with http.post(gw.url(), json=tool_call(tool), headers=headers) as resp:
                status, answer = resp.status, await resp.json(content_type=None)
            assert status == 502, answer
            assert answer["error"]["data"]["code"] == "upstream_answer_too_large"
            assert "65536" in answer["error"]["message"] and "Nothing was charged" in json.dumps(answer)

            async with http.post(gw.url(), json=tool_call("small"), headers=headers) as resp:
                assert resp.status == 200 and "small" in await resp.text()  # the server still answers
            await gw.settled()
            assert await gw.balance("alice") == parse_cents("100") - parse_cents("5")  # only the small call
            assert await gw.held("alice") == 0
