"""The gateway as an edge in front of upstreams: forwarded headers, secrets, redirects, fees."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, run_gateway, tool_call, write_config

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


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
