"""An MCP server monetised with the AgentPay SDK, without the proxy (needs `pip install mcp uvicorn`).

    AGENTPAY_URL=http://127.0.0.1:8080 AGENTPAY_SERVICE_TOKEN=apst_... python -m gateway.examples.paid_server

Users call it with their AgentPay key in `Authorization: Bearer ap_...`; each successful
`forecast` costs them 2.5¢, a failing call costs nothing.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import Context, MCPServer

from gateway.sdk import AgentPay, paid_tool


def build(pay: AgentPay) -> MCPServer:
    server = MCPServer("paid-weather")

    @server.tool()
    @paid_tool(pay, "2.5")
    async def forecast(city: str, ctx: Context) -> str:
        """Tomorrow's weather for a city (2.5¢ per successful call)."""
        if not city.strip():
            raise ValueError("city must not be empty")  # raised → the hold is released, nothing charged
        return f"Sunny in {city}"

    return server


if __name__ == "__main__":
    pay = AgentPay(os.environ["AGENTPAY_URL"], os.environ["AGENTPAY_SERVICE_TOKEN"])
    build(pay).run("streamable-http", host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
