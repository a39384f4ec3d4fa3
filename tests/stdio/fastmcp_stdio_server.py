"""A real stdio MCP server for the stdio tests: the official SDK's MCPServer (FastMCP) run over stdio.

    python -m tests.stdio.fastmcp_stdio_server

Tools: a priced one, one reporting progress, one asking for sampling and one for elicitation, one
that exits the process mid-call, one that blocks until its marker file appears, one that reports
its environment; a resource template and a prompt.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import mcp.types as types
from mcp.server.mcpserver import Context, MCPServer


def build_server() -> MCPServer:
    srv = MCPServer("stdio-fixture", version="1.0.0")

    @srv.tool()
    def get_forecast(city: str) -> str:
        """Forecast for a city (priced)."""
        return f"Sunny in {city}"

    @srv.tool()
    def echo(message: str) -> str:
        """Echo (free)."""
        return message

    @srv.tool()
    def boom() -> str:
        """Always fails (priced: never charged)."""
        raise ValueError("the tool failed")

    @srv.tool()
    async def slow_count(steps: int, ctx: Context) -> str:
        """Reports progress once per step."""
        for step in range(1, steps + 1):
            await ctx.report_progress(progress=step, total=steps, message=f"step {step}")
        return f"counted to {steps}"

    @srv.tool()
    async def ask_llm(prompt: str, ctx: Context) -> str:
        """Asks the client's LLM (sampling) and returns its answer."""
        message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
        result = await ctx.session.create_message(messages=[message], max_tokens=50)
        content = result.content
        return "LLM said: " + (content.text if isinstance(content, types.TextContent) else str(content))

    @srv.tool()
    async def ask_user(question: str, ctx: Context) -> str:
        """Asks the user (elicitation) for their name."""
        schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        result = await ctx.session.elicit_form(question, requested_schema=schema)
        return f"action={result.action} name={(result.content or {}).get('name')}"

    @srv.tool()
    def crash() -> str:
        """Exits the process in the middle of the call (priced: never charged)."""
        sys.stdout.flush()
        os._exit(3)

    @srv.tool()
    async def wait_for_file(path: str) -> str:
        """Writes its pid to ``path``.pid, then blocks until ``path`` exists (priced)."""
        Path(path + ".pid").write_text(str(os.getpid()))
        while True:  # the test creates the file from another process: polled
            if Path(path).exists():
                return "released"
            await asyncio.sleep(0.02)

    @srv.tool()
    def pid() -> str:
        """This process's id."""
        return str(os.getpid())

    @srv.tool()
    def environment() -> str:
        """The names of the environment variables this process sees, and one value."""
        return ",".join(sorted(os.environ)) + "|" + os.environ.get("FIXTURE_TOKEN", "")

    @srv.resource("weather://alerts/{region}")
    def alerts(region: str) -> str:
        return f"No alerts in {region}"

    @srv.prompt()
    def daily_brief(city: str) -> str:
        return f"Write the daily weather brief for {city}."

    return srv


def main() -> None:
    build_server().run("stdio")


if __name__ == "__main__":
    main()
