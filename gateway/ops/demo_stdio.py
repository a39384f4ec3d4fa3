"""The demo's stdio MCP server: a tiny server that speaks MCP only over stdin/stdout (JSON lines), as
most servers in the registries do. The gateway runs it (``command:`` in the demo config), one process
per session, and serves it over Streamable HTTP with prices and billing.

    python3 gateway/ops/demo_stdio.py

Standard library only, so any ``python3`` runs it. Tools ``echo`` (free), ``get_forecast`` (priced in
the demo's price table) and ``count`` (reports progress when asked); resource ``demo://readme``;
prompt ``daily_brief``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
_TOOLS = [
    {
        "name": "echo",
        "description": "Echo a message",
        "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
    },
    {
        "name": "get_forecast",
        "description": "The forecast for a city",
        "inputSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    {
        "name": "count",
        "description": "Count to n, reporting progress",
        "inputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}},
    },
]


def _text(text: str) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": text}], "isError": False}


def answer(message: dict[str, Any], send: Any) -> dict[str, Any] | None:
    """The result of one request (None for an unknown method: an error is sent instead)."""
    method, params = message.get("method"), message.get("params") or {}
    if method == "initialize":
        asked = params.get("protocolVersion")
        return {
            "protocolVersion": asked if asked in _VERSIONS else _VERSIONS[1],
            "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
            "serverInfo": {"name": "agentpay-demo-stdio", "version": "1.0.0"},
        }
    if method == "ping":
        return {}
    if method == "tools/list":
        return {"tools": _TOOLS}
    if method == "tools/call":
        args = params.get("arguments") or {}
        name = params.get("name")
        if name == "echo":
            return _text(str(args.get("message", "")))
        if name == "get_forecast":
            return _text(f"Sunny in {args.get('city', 'your city')}, 21 °C")
        if name == "count":
            n = args.get("n", 3) if isinstance(args.get("n"), int) else 3
            token = (params.get("_meta") or {}).get("progressToken")
            for step in range(1, min(n, 100) + 1):
                if token is not None:
                    progress = {"progressToken": token, "progress": step, "total": n}
                    send({"jsonrpc": "2.0", "method": "notifications/progress", "params": progress})
            return _text(f"counted to {n}")
        return {**_text(f"Unknown tool {name!r}"), "isError": True}
    if method == "resources/list":
        return {"resources": [{"uri": "demo://readme", "name": "readme", "mimeType": "text/plain"}]}
    if method == "resources/read":
        text = "This server speaks stdio only; AgentPay runs it and bills its calls."
        return {"contents": [{"uri": params.get("uri"), "mimeType": "text/plain", "text": text}]}
    if method == "prompts/list":
        return {"prompts": [{"name": "daily_brief", "arguments": [{"name": "city", "required": True}]}]}
    if method == "prompts/get":
        city = (params.get("arguments") or {}).get("city", "your city")
        brief = {"type": "text", "text": f"Write the daily weather brief for {city}."}
        return {"messages": [{"role": "user", "content": brief}]}
    return None


def main() -> None:
    def send(value: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if not isinstance(message, dict) or "id" not in message or "method" not in message:
            continue  # notifications and responses need no answer
        result = answer(message, send)
        if result is None:
            error = {"code": -32601, "message": f"Method not found: {message.get('method')}"}
            send({"jsonrpc": "2.0", "id": message["id"], "error": error})
        else:
            send({"jsonrpc": "2.0", "id": message["id"], "result": result})


if __name__ == "__main__":
    main()
