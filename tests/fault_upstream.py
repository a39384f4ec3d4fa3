"""The fault-injecting upstream (gateway.ops.demo_upstream) on a loopback ephemeral port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp.test_utils import TestServer

from gateway.ops.demo_upstream import DemoUpstream


@asynccontextmanager
async def run_fault_upstream(*, sse: bool = False) -> AsyncIterator[tuple[str, DemoUpstream]]:
    upstream = DemoUpstream(sse=sse)
    server = TestServer(upstream.app(), host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("/mcp")), upstream
    finally:
        await server.close()
