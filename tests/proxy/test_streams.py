"""Long-lived streams: they stay open through the gateway, events arrive one by one, and closing the
client's stream cancels the upstream request (otherwise idle streams pile up upstream)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.money import parse_cents
from tests.harness import rpc, run_gateway, write_config

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class ListenUpstream:
    """`subscriptions/listen` (2026-07-28) as a long-lived POST stream, driven by the test."""

    def __init__(self) -> None:
        self.send: asyncio.Queue[str] = asyncio.Queue()
        self.opened = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.opened.set()
        try:
            while True:
                data = await self.send.get()
                await response.write(f"event: message\ndata: {data}\n\n".encode())
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_a_listen_stream_stays_open_relays_each_event_and_closing_it_cancels_upstream(tmp_path: Path) -> None:
    upstream = ListenUpstream()
    app = web.Application()
    app.router.add_post("/mcp", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()  # TestServer cancels handlers when their client goes away
    try:
        async with run_gateway(write_config(tmp_path, {"weather": str(server.make_url("/mcp"))})) as gw:
            key = await gw.new_user("alice", "100")
            async with aiohttp.ClientSession() as http:
                resp = await http.post(
                    gw.url(),
                    json=rpc("subscriptions/listen", {"_meta": {}}, rid=1),
                    headers={**HEADERS, "Authorization": f"Bearer {key}"},
                )
                assert resp.status == 200
                for n in range(3):  # each event arrives on its own, without the stream ending
                    note = json.dumps(
                        {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"n": n}}
                    )
                    await upstream.send.put(note)
                    async with asyncio.timeout(5):
                        line = await resp.content.readline()
                        while not line.startswith(b"data:"):
                            line = await resp.content.readline()
                    assert json.loads(line[5:])["params"]["n"] == n
                resp.close()  # the client goes away
            async with asyncio.timeout(10):
                await upstream.cancelled.wait()
    finally:
        await server.close()


async def test_a_priced_stream_silent_past_stream_idle_timeout_is_closed_its_upstream_dropped_and_nothing_charged(
    tmp_path: Path,
) -> None:
    upstream = ListenUpstream()  # answers a tools/call with a stream that says only what the test sends
    app = web.Application()
    app.router.add_post("/mcp", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        config = write_config(tmp_path, {"weather": str(server.make_url("/mcp"))}, stream_idle_timeout_s=0.5)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
            key = await gw.new_user("alice", "100")
            call = rpc("tools/call", {"name": "get_forecast", "arguments": {}}, rid=7)
            async with http.post(gw.url(), json=call, headers={**HEADERS, "Authorization": f"Bearer {key}"}) as resp:
                assert resp.status == 200
                progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
                await upstream.send.put(json.dumps(progress))  # then nothing more: no answer ever comes
                async with asyncio.timeout(10):
                    body = await resp.read()  # ends when the gateway closes the silent stream
            assert b"notifications/progress" in body and b'"result"' not in body
            async with asyncio.timeout(10):
                await upstream.cancelled.wait()  # the upstream request was dropped with it
            await gw.settled()
            assert await gw.held("alice") == 0
            assert await gw.balance("alice") == parse_cents("100")  # the unanswered call was not charged
    finally:
        await server.close()
