"""The gateway owns the ids it sends upstream: a cancellation names the request by the id the upstream
knows, and the client only ever sees its own ids."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.harness import rpc, run_gateway, tool_call, write_config

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class SlowUpstream:
    """Answers tools/call only when released; records every message it receives."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.call_arrived = asyncio.Event()
        self.cancel_arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.received.append(body)
        if body.get("method") == "notifications/cancelled":
            self.cancel_arrived.set()
            return web.Response(status=202)
        self.call_arrived.set()
        await self.release.wait()
        result = {"content": [{"type": "text", "text": "done"}]}
        return web.json_response({"jsonrpc": "2.0", "id": body["id"], "result": result})


async def test_a_cancellation_names_the_request_by_the_id_the_upstream_was_given(tmp_path: Path) -> None:
    upstream = SlowUpstream()
    app = web.Application()
    app.router.add_post("/mcp", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        async with run_gateway(write_config(tmp_path, {"weather": str(server.make_url("/mcp"))})) as gw:
            key = await gw.new_user("alice", "100")
            headers = {**HEADERS, "Authorization": f"Bearer {key}"}
            async with aiohttp.ClientSession() as http:
                call = asyncio.ensure_future(
                    http.post(gw.url(), json=tool_call("get_forecast", {"city": "x"}, rid=5), headers=headers)
                )
                async with asyncio.timeout(10):
                    await upstream.call_arrived.wait()
                cancel = rpc("notifications/cancelled", {"requestId": 5, "reason": "changed my mind"}, rid=None)
                async with http.post(gw.url(), json=cancel, headers=headers) as resp:
                    assert resp.status == 202
                async with asyncio.timeout(10):
                    await upstream.cancel_arrived.wait()
                upstream.release.set()
                async with await call as resp:
                    answer = await resp.json()
            sent_id = upstream.received[0]["id"]
            assert isinstance(sent_id, str) and sent_id != "5"  # the upstream never saw the client's id
            assert upstream.received[1]["params"] == {"requestId": sent_id, "reason": "changed my mind"}
            assert answer["id"] == 5  # the client gets its own id back
            await gw.verify_clean()
    finally:
        await server.close()
