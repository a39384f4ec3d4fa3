"""A real MCP server (the official `mcp` SDK's MCPServer) run by uvicorn on a loopback ephemeral port,
in the test's own event loop. It records every tool execution it completed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.streamable_http import EventMessage, EventStore


@dataclass
class UpstreamLog:
    completed: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)


def build_server(log: UpstreamLog) -> MCPServer:
    srv = MCPServer("weather-fixture")

    @srv.tool()
    def echo(message: str) -> str:
        """Echo a message (free)."""
        log.completed.append("echo")
        return message

    @srv.tool()
    def get_forecast(city: str) -> str:
        """Forecast for a city (priced)."""
        log.completed.append("get_forecast")
        return f"Sunny in {city}"

    @srv.tool()
    def premium_report(city: str) -> str:
        """A premium report (priced by glob)."""
        log.completed.append("premium_report")
        return f"Premium report for {city}"

    @srv.tool()
    def boom() -> str:
        """Always fails."""
        raise ValueError("the tool failed")

    @srv.tool()
    async def wait_for_release() -> str:
        """Blocks until the test releases it."""
        log.started.set()
        await log.release.wait()
        log.completed.append("wait_for_release")
        return "released"

    @srv.resource("weather://alerts/{region}")
    def alerts(region: str) -> str:
        log.completed.append(f"alerts:{region}")
        return f"No alerts in {region}"

    @srv.prompt()
    def daily_brief(city: str) -> str:
        log.completed.append("daily_brief")
        return f"Write the daily weather brief for {city}."

    return srv


class _Server(uvicorn.Server):
    """uvicorn's server, announcing through an event when it is accepting connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


@dataclass
class RunningUpstream:
    url: str
    log: UpstreamLog


@asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a loopback ephemeral port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = _Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            await server.ready.wait()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
        sock.close()


class MemoryEventStore(EventStore):
    """Keeps every event so a client can resume a stream with Last-Event-ID."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []  # (event id, stream id, message)

    async def store_event(self, stream_id: str, message: Any) -> str:
        event_id = str(len(self.events) + 1)
        self.events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        stream = next((s for e, s, _ in self.events if e == last_event_id), None)
        if stream is None:
            return None
        after = False
        for event_id, stream_id, message in self.events:
            if after and stream_id == stream and message is not None:
                await send_callback(EventMessage(message, event_id))
            after = after or event_id == last_event_id
        return stream


@asynccontextmanager
async def run_upstream(
    *, json_response: bool = False, stateless: bool = False, resumable: bool = False, legacy_sse: bool = False
) -> AsyncIterator[RunningUpstream]:
    log = UpstreamLog()
    server_def = build_server(log)
    app = (
        server_def.sse_app()
        if legacy_sse
        else server_def.streamable_http_app(
            json_response=json_response,
            stateless_http=stateless,
            event_store=MemoryEventStore() if resumable else None,
            retry_interval=100 if resumable else None,
        )
    )
    async with serve_asgi(app) as base:
        try:
            yield RunningUpstream(url=f"{base}/mcp", log=log)
        finally:
            log.release.set()
