"""The realistic upstream: a FastMCP (4.x) server with one tool, stateless HTTP, JSON responses.

Runs in the bench's FastMCP virtualenv (``bench/.venvs/fastmcp``), not the project's:
``bench/.venvs/fastmcp/bin/python bench/fastmcp_upstream.py PORT``.
"""

from __future__ import annotations

import sys

from fastmcp import FastMCP


def get_forecast(city: str = "Paris") -> str:
    """Weather forecast for a city."""
    return f"Sunny in {city}"


if __name__ == "__main__":
    mcp = FastMCP("bench-upstream")
    mcp.tool(get_forecast)
    mcp.run(
        transport="http",
        host="127.0.0.1",
        port=int(sys.argv[1]),
        stateless_http=True,
        json_response=True,
        show_banner=False,
        log_level="warning",
    )
