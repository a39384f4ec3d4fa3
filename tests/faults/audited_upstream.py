"""An MCP upstream (streamable HTTP, stateless) run as its own OS process, so it can be SIGKILLed,
that writes an append-only, fsynced audit log of the tool executions it completed.

    python -m tests.faults.audited_upstream --port PORT --log PATH

Prints ``LISTENING <port>`` on stdout once it accepts connections.

Tools are ``job_<nonce>``; the call's arguments say how to answer and which fault to inject::

    {"nonce": "n000042",            # the call id; must match the tool name
     "answer": "json" | "sse",
     "fault": null | "delay" | "reset" | "5xx" | "garbage" | "truncate_json" | "truncate_sse"
              | "end_sse" | "slow_body" | "rpc_error" | "tool_error",
     "delay_s": 0.0,                 # "delay": wait before the response headers
     "events": 0, "gap_s": 0.0,      # sse: progress events before the result, ``gap_s`` apart
     "chunks": 1}                    # "slow_body": the JSON body in this many pieces, ``gap_s`` apart

Audit log, one JSON object per line (``os.write`` of the whole line on an ``O_APPEND`` descriptor,
then ``fsync``)::

    {"nonce": …, "phase": "sending", "outcome": "ok" | "rpc_error" | "tool_error"}
        written just before the last bytes of the response (the answer) are written
    {"nonce": …, "phase": "completed", "outcome": …}
        written after the whole response was written and the connection was still open
    {"nonce": …, "phase": "aborted", "outcome": …}
        the client (the gateway) went away before the response was written

A charge is legitimate only for a nonce with a ``completed`` ``ok`` line; ``sending`` without
``completed`` happens only when this process was killed between the two lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from typing import Any

from aiohttp import web

PROTOCOL_VERSION = "2025-06-18"
TOOL_PREFIX = "job_"


class AuditLog:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, nonce: str, phase: str, outcome: str) -> None:
        line = json.dumps({"nonce": nonce, "phase": phase, "outcome": outcome, "pid": os.getpid(), "t": time.time()})
        os.write(self.fd, line.encode() + b"\n")
        os.fsync(self.fd)


def _result(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def _event(body: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(body).encode() + b"\n\n"


class AuditedUpstream:
    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self._post)
        app.router.add_route("*", "/mcp", self._not_allowed)
        return app

    async def _not_allowed(self, request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "POST"})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        try:
            message = await request.json()
        except ValueError:
            return web.json_response(_error(None, -32700, "Parse error"), status=400)
        if not isinstance(message, dict) or "id" not in message:
            return web.Response(status=202)
        rid, method, params = message["id"], message.get("method"), message.get("params") or {}
        if method == "initialize":
            return web.json_response(
                _result(
                    rid,
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {"tools": {}},
                        "serverInfo": {"name": "audited-upstream", "version": "1.0"},
                    },
                )
            )
        if method == "ping":
            return web.json_response(_result(rid, {}))
        if method == "tools/list":
            return web.json_response(_result(rid, {"tools": []}))
        if method != "tools/call":
            return web.json_response(_error(rid, -32601, f"Method not found: {method}"))
        name = str(params.get("name", ""))
        args = params.get("arguments") or {}
        nonce = args.get("nonce")
        if not name.startswith(TOOL_PREFIX) or nonce != name[len(TOOL_PREFIX) :]:
            return web.json_response(_error(rid, -32602, f"Unknown tool or nonce mismatch: {name}"))
        return await self._call(request, rid, str(nonce), args)

    async def _call(self, request: web.Request, rid: Any, nonce: str, args: dict[str, Any]) -> web.StreamResponse:
        fault = args.get("fault")
        sse = args.get("answer") == "sse"
        gap = float(args.get("gap_s", 0.0))
        if fault == "delay":
            await asyncio.sleep(float(args.get("delay_s", 0.0)))
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "5xx":
            return web.Response(status=int(args.get("status", 500)), text="upstream exploded")
        if fault == "rpc_error":
            outcome, body = "rpc_error", _error(rid, -32603, f"job {nonce} crashed")
        elif fault == "tool_error":
            outcome = "tool_error"
            body = _result(rid, {"content": [{"type": "text", "text": f"job {nonce} failed"}], "isError": True})
        else:
            outcome = "ok"
            body = _result(rid, {"content": [{"type": "text", "text": f"done {nonce}"}]})
        if sse:
            return await self._sse(request, rid, nonce, args, fault, outcome, body, gap)
        return await self._json(request, nonce, args, fault, outcome, body, gap)

    async def _json(
        self,
        request: web.Request,
        nonce: str,
        args: dict[str, Any],
        fault: Any,
        outcome: str,
        body: dict[str, Any],
        gap: float,
    ) -> web.StreamResponse:
        raw = json.dumps(body).encode()
        if fault == "garbage":
            raw = b'{"jsonrpc": "2.0", "id": <<not json>> ' + nonce.encode()
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(raw)
        try:
            await response.prepare(request)
            if fault == "truncate_json":
                await response.write(raw[: len(raw) // 2])
                if request.transport is not None:
                    request.transport.abort()
                return response
            pieces = max(1, int(args.get("chunks", 1))) if fault == "slow_body" else 1
            step = -(-len(raw) // pieces)
            parts = [raw[i : i + step] for i in range(0, len(raw), step)]
            for part in parts[:-1]:
                await response.write(part)
                await asyncio.sleep(gap)  # the fault: a body that dribbles in
            return await self._finish(request, response, nonce, "garbage" if fault == "garbage" else outcome, parts[-1])
        except ConnectionResetError:
            self.log.write(nonce, "aborted", outcome)
            return response

    async def _sse(
        self,
        request: web.Request,
        rid: Any,
        nonce: str,
        args: dict[str, Any],
        fault: Any,
        outcome: str,
        body: dict[str, Any],
        gap: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await response.write(b": priming\n\n")
            for i in range(int(args.get("events", 0))):
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": f"p-{nonce}", "progress": i + 1},
                }
                await response.write(_event(note))
                await asyncio.sleep(gap)  # the stream's pace: kills and cancels land in these gaps
            if fault == "end_sse":
                await response.write_eof()
                self.log.write(nonce, "completed", "no_answer")
                return response
            if fault == "garbage":
                return await self._finish(request, response, nonce, "garbage", b"event: message\ndata: {oops\n\n")
            final = _event(body)
            if fault == "truncate_sse":
                await response.write(final[: len(final) // 2])
                if request.transport is not None:
                    request.transport.abort()
                return response
            return await self._finish(request, response, nonce, outcome, final)
        except ConnectionResetError:
            self.log.write(nonce, "aborted", outcome)
            return response

    async def _finish(
        self, request: web.Request, response: web.StreamResponse, nonce: str, outcome: str, last: bytes
    ) -> web.StreamResponse:
        self.log.write(nonce, "sending", outcome)
        await response.write(last)
        await response.write_eof()
        transport = request.transport
        if transport is None or transport.is_closing():
            self.log.write(nonce, "aborted", outcome)
        else:
            self.log.write(nonce, "completed", outcome)
        return response


async def serve(host: str, port: int, log_path: str) -> None:
    upstream = AuditedUpstream(AuditLog(log_path))
    runner = web.AppRunner(upstream.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if port == 0 else port
    print(f"LISTENING {bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audited_upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.log))
    return 0


if __name__ == "__main__":
    sys.exit(main())
