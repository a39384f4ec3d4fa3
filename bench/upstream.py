"""The minimal upstream: a plain aiohttp MCP server (default event loop, stdlib json).

``POST /mcp`` answers in JSON, ``POST /mcp-sse`` answers the same in SSE. A ``tools/call`` with
``arguments.ticks = N`` (SSE path) first sends N progress notifications ``interval_ms`` apart, each
carrying ``t_ns``: the ``time.monotonic_ns()`` at which it was written (one clock for every process
on the machine), so a client can measure the relay delay. ``GET`` on either path opens a standalone
SSE stream that stays open (a priming comment, then a heartbeat comment every 30 s) until the
client leaves: the memory run holds thousands of them through the gateway.

Run: ``python -m bench.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from aiohttp import web

TOOL = {
    "name": "get_forecast",
    "description": "Weather forecast for a city.",
    "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
STATS: dict[str, int] = {"calls": 0, "streams": 0, "open_streams": 0}


def _result(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _answer(message: dict[str, Any]) -> dict[str, Any] | None:
    method = message.get("method")
    rid = message.get("id")
    if "id" not in message:
        return None  # a notification
    if method == "tools/call":
        STATS["calls"] += 1
        args = (message.get("params") or {}).get("arguments") or {}
        return _result(rid, {"content": [{"type": "text", "text": f"Sunny in {args.get('city', 'Paris')}"}]})
    if method == "initialize":
        asked = (message.get("params") or {}).get("protocolVersion") or "2025-06-18"
        return _result(
            rid,
            {
                "protocolVersion": asked,
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "bench-upstream", "version": "1.0"},
            },
        )
    if method == "tools/list":
        return _result(rid, {"tools": [TOOL]})
    if method == "ping":
        return _result(rid, {})
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": f"Method not found: {method}"}}


def _event(value: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(value).encode() + b"\n\n"


async def post_json(request: web.Request) -> web.Response:
    try:
        message = json.loads(await request.read())
    except ValueError:
        return web.Response(status=400, text="bad json")
    answer = _answer(message) if isinstance(message, dict) else None
    if answer is None:
        return web.Response(status=202)
    return web.Response(body=json.dumps(answer).encode(), content_type="application/json")


async def post_sse(request: web.Request) -> web.StreamResponse:
    try:
        message = json.loads(await request.read())
    except ValueError:
        return web.Response(status=400, text="bad json")
    answer = _answer(message) if isinstance(message, dict) else None
    if answer is None:
        return web.Response(status=202)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    args = (message.get("params") or {}).get("arguments") or {}
    ticks = int(args.get("ticks", 0)) if message.get("method") == "tools/call" else 0
    interval = float(args.get("interval_ms", 5)) / 1000
    token = message.get("id")
    for i in range(ticks):
        await asyncio.sleep(interval)
        note = {
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": {"progressToken": token, "progress": i + 1, "total": ticks, "t_ns": time.monotonic_ns()},
        }
        await response.write(_event(note))
    if ticks:
        await asyncio.sleep(interval)
        answer["result"]["_meta"] = {"t_ns": time.monotonic_ns()}
    await response.write(_event(answer))
    await response.write_eof()
    return response


async def get_stream(request: web.Request) -> web.StreamResponse:
    if "text/event-stream" not in request.headers.get("Accept", ""):
        return web.Response(status=405, headers={"Allow": "POST"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    STATS["streams"] += 1
    STATS["open_streams"] += 1
    try:
        await response.write(b": open\n\n")
        while True:
            await asyncio.sleep(30)
            await response.write(b": heartbeat\n\n")
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        STATS["open_streams"] -= 1
    return response


async def stats(request: web.Request) -> web.Response:
    return web.json_response(STATS)


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/mcp", post_json)
    app.router.add_post("/mcp-sse", post_sse)
    app.router.add_get("/mcp", get_stream)
    app.router.add_get("/mcp-sse", get_stream)
    app.router.add_delete("/mcp", delete)
    app.router.add_get("/stats", stats)
    return app


async def delete(request: web.Request) -> web.Response:
    return web.Response(status=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(), host=args.host, port=args.port, access_log=None, print=None, backlog=4096, shutdown_timeout=1
    )


if __name__ == "__main__":
    main()
