"""A small, dependency-free MCP server (streamable HTTP, handshake era) used by `agentpay demo`
and by the tests as a fault-injecting upstream.

It answers in JSON, or in SSE with ``sse=True`` (a progress notification, then the response).
Fault switches are tools: ``fail_500``, ``garbage``, ``truncate`` (SSE that ends before the
response), ``reset`` (drops the connection), ``slow`` (waits ``seconds`` before answering),
``rpc_error`` and ``tool_error``. Every tool execution that completed is recorded in ``completed``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

PROTOCOL_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")

TOOLS: list[dict[str, Any]] = [
    {
        "name": "echo",
        "description": "Echo a message back.",
        "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
    },
    {
        "name": "get_forecast",
        "description": "Weather forecast for a city.",
        "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "name": "premium_report",
        "description": "A detailed premium weather report.",
        "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
    {
        "name": "translate",
        "description": "Translate a text (metered: reports 0.1 cent per character in io.agentpay/charge).",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "to": {"type": "string"}},
            "required": ["text"],
        },
    },
    {
        "name": "add",
        "description": "Add two integers.",
        "inputSchema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
    *[
        {"name": name, "description": f"Fault switch: {name}.", "inputSchema": {"type": "object"}}
        for name in ("fail_500", "garbage", "truncate", "reset", "slow", "rpc_error", "tool_error", "ask")
    ],
]
RESOURCES = [{"uri": "demo://alerts/north", "name": "alerts-north", "mimeType": "text/plain"}]
PROMPTS = [{"name": "daily_brief", "description": "A daily weather brief.", "arguments": [{"name": "city"}]}]


@dataclass
class DemoUpstream:
    sse: bool = False
    completed: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # headers seen, for hygiene tests
    tasks: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)  # task id -> (tool, args)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self._post)
        app.router.add_get("/mcp", self._get)
        app.router.add_delete("/mcp", self._delete)
        return app

    async def _get(self, request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "POST, DELETE"})

    async def _delete(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.requests.append({"headers": dict(request.headers), "path": request.path_qs})
        try:
            message = await request.json()
        except ValueError:
            return web.json_response(_error(None, -32700, "Parse error"), status=400)
        if isinstance(message, list):  # a 2025-03-26 batch: answer every request in one array
            answers = [self._answer(m.get("id"), m.get("method"), m.get("params") or {}) for m in message if "id" in m]
            return web.json_response(answers) if answers else web.Response(status=202)
        if "id" not in message:
            return web.Response(status=202)
        method = message.get("method")
        params = message.get("params") or {}
        rid = message.get("id")
        if method == "tools/call" and isinstance(params.get("task"), dict):  # 2025-11-25 task-augmented
            task_id = uuid.uuid4().hex
            self.tasks[task_id] = (params.get("name"), params.get("arguments") or {})
            return await self._send(request, _result(rid, {"task": {"taskId": task_id, "status": "working"}}))
        if method == "tools/call":
            return await self._call(request, rid, params.get("name"), params.get("arguments") or {})
        body = self._answer(rid, method, params)
        headers = {}
        if method == "initialize":
            headers["Mcp-Session-Id"] = uuid.uuid4().hex
        return await self._send(request, body, headers=headers)

    def _answer(self, rid: Any, method: str | None, params: dict[str, Any]) -> dict[str, Any]:
        if method == "initialize":
            asked = params.get("protocolVersion")
            version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
            return _result(
                rid,
                {
                    "protocolVersion": version,
                    "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
                    "serverInfo": {"name": "agentpay-demo", "version": "1.0"},
                },
            )
        if method == "ping":
            return _result(rid, {})
        if method == "tools/call":
            return self._tool(rid, params.get("name"), params.get("arguments") or {})
        if method == "tasks/result":
            name, args = self.tasks.pop(str(params.get("taskId")), (None, {}))
            if name is None:
                return _error(rid, -32602, "Unknown task")
            return self._tool(rid, name, args)
        if method == "tasks/cancel":
            self.tasks.pop(str(params.get("taskId")), None)
            return _result(rid, {"taskId": params.get("taskId"), "status": "cancelled"})
        if method == "tools/list":
            return _result(rid, {"tools": TOOLS})
        if method == "resources/list":
            return _result(rid, {"resources": RESOURCES})
        if method == "resources/read":
            uri = params.get("uri", "")
            if not str(uri).startswith("demo://alerts/"):
                return _error(rid, -32002, f"Resource not found: {uri}")
            self.completed.append(f"read:{uri}")
            return _result(rid, {"contents": [{"uri": uri, "mimeType": "text/plain", "text": "No alerts."}]})
        if method == "prompts/list":
            return _result(rid, {"prompts": PROMPTS})
        if method == "prompts/get":
            if params.get("name") != "daily_brief":
                return _error(rid, -32602, f"Unknown prompt: {params.get('name')}")
            self.completed.append("prompt:daily_brief")
            city = (params.get("arguments") or {}).get("city", "your city")
            return _result(
                rid,
                {
                    "messages": [
                        {"role": "user", "content": {"type": "text", "text": f"Write the weather brief for {city}."}}
                    ]
                },
            )
        return _error(rid, -32601, f"Method not found: {method}")

    async def _call(self, request: web.Request, rid: Any, name: Any, args: dict[str, Any]) -> web.StreamResponse:
        if name == "fail_500":
            return web.Response(status=500, text="internal error")
        if name == "garbage":
            return web.Response(status=200, body=b'{"jsonrpc": "2.0", "id": ', content_type="application/json")
        if name == "reset":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if name == "slow":
            await asyncio.sleep(float(args.get("seconds", 5)))
        if name == "truncate":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(
                _event(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/progress",
                        "params": {"progressToken": rid, "progress": 1},
                    }
                )
            )
            if request.transport is not None:
                request.transport.abort()
            return response
        if name == "rpc_error":
            return await self._send(request, _error(rid, -32603, "The tool crashed"))
        if name == "tool_error":
            return await self._send(
                request, _result(rid, {"content": [{"type": "text", "text": "It went wrong"}], "isError": True})
            )
        return await self._send(request, self._tool(rid, name, args))

    def _tool(self, rid: Any, name: Any, args: dict[str, Any]) -> dict[str, Any]:
        """The answer of a tool that needs no transport tricks."""
        if name == "ask" and "answer" not in args:  # 2026-07-28 multi-round: input first, then the result
            return _result(
                rid,
                {
                    "resultType": "input_required",
                    "inputRequests": {"answer": {"method": "elicitation/create", "params": {"message": "Which city?"}}},
                },
            )
        if name == "translate":  # metered: the cost of the call is reported with its result
            source = str(args.get("text", ""))
            self.completed.append("translate")
            cost = Decimal(len(source)) / 10  # 0.1 cent per character, at most 1 decimal: exact
            return _result(
                rid,
                {
                    "content": [{"type": "text", "text": f"[{args.get('to', 'en')}] {source}"}],
                    "_meta": {"io.agentpay/charge": {"amount_cents": str(cost)}},
                },
            )
        tools: dict[str, Callable[[], str]] = {
            "echo": lambda: str(args.get("message", "")),
            "get_forecast": lambda: f"Sunny in {args.get('city', 'your city')}",
            "premium_report": lambda: f"Premium report for {args.get('city', 'your city')}: calm.",
            "add": lambda: str(int(args.get("a", 0)) + int(args.get("b", 0))),
            "slow": lambda: "finally",
            "ask": lambda: f"You answered {args.get('answer')}",
        }
        text = tools.get(str(name))
        if text is None:
            return _error(rid, -32602, f"Unknown tool: {name}")
        self.completed.append(str(name))
        return _result(rid, {"content": [{"type": "text", "text": text()}]})

    async def _send(
        self, request: web.Request, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        if not self.sse:
            return web.json_response(body, headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", **(headers or {})})
        await response.prepare(request)
        await response.write(b": priming\n\n")
        await response.write(_event(body))
        await response.write_eof()
        return response


def _event(body: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(body).encode() + b"\n\n"


def _result(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
