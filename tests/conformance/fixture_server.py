"""An MCP server (the official Python SDK's MCPServer) implementing what the server scenarios of the
npm package ``@modelcontextprotocol/conformance`` 0.1.x expect: the ``test_*`` tools, the
``test://`` resources, the ``test_*`` prompts, logging, subscriptions, completion, SSE resumability
(an in-memory event store, so ``test_reconnection`` can close its stream mid-call) and DNS-rebinding
protection on loopback.

    python -m tests.conformance.fixture_server --port 8123        # serves http://127.0.0.1:8123/mcp
    python -m tests.conformance.fixture_server --stdio            # the same server over stdio
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import struct
import wave
import zlib
from typing import Any

import anyio
import mcp.types as types
import uvicorn
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from starlette.applications import Starlette


def _png_1x1() -> bytes:
    """A valid 1x1 red PNG, built here rather than pasted as a blob."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    pixels = zlib.compress(b"\x00\xff\x00\x00")  # filter byte 0, then one red pixel
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _wav_silence() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(b"\x00\x00" * 80)  # 10 ms of silence
    return out.getvalue()


PNG = _png_1x1()
PNG_B64 = base64.b64encode(PNG).decode()
WAV_B64 = base64.b64encode(_wav_silence()).decode()

JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
    "additionalProperties": False,
}

SEP1034_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    },
}

SEP1330_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {
            "type": "string",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {"type": "array", "items": {"type": "string", "enum": ["option1", "option2", "option3"]}},
        "titledMulti": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    },
}


class MemoryEventStore(EventStore):
    """Keeps every SSE event so a client can resume a closed stream with Last-Event-ID."""

    def __init__(self) -> None:
        self._events: list[tuple[StreamId, EventId, types.JSONRPCMessage | None]] = []

    async def store_event(self, stream_id: StreamId, message: types.JSONRPCMessage | None) -> EventId:
        event_id = str(len(self._events) + 1)
        self._events.append((stream_id, event_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        stream = next((s for s, e, _ in self._events if e == last_event_id), None)
        if stream is None:
            return None
        for stream_id, event_id, message in self._events:
            if stream_id == stream and int(event_id) > int(last_event_id) and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream


def build_server() -> MCPServer:
    srv = MCPServer("agentpay-conformance-fixture", version="1.0.0")
    subscriptions: set[str] = set()

    @srv.tool()
    def test_simple_text() -> str:
        """Returns a simple text response."""
        return "This is a simple text response for testing."

    @srv.tool()
    def test_image_content() -> list[types.ImageContent]:
        """Returns a 1x1 PNG."""
        return [types.ImageContent(type="image", data=PNG_B64, mime_type="image/png")]

    @srv.tool()
    def test_audio_content() -> list[types.AudioContent]:
        """Returns a short WAV."""
        return [types.AudioContent(type="audio", data=WAV_B64, mime_type="audio/wav")]

    @srv.tool()
    def test_embedded_resource() -> list[types.EmbeddedResource]:
        """Returns an embedded text resource."""
        resource = types.TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
        )
        return [types.EmbeddedResource(type="resource", resource=resource)]

    @srv.tool()
    def test_multiple_content_types() -> list[types.TextContent | types.ImageContent | types.EmbeddedResource]:
        """Returns text, an image and an embedded resource."""
        resource = types.TextResourceContents(
            uri="test://mixed-content-resource",
            mime_type="application/json",
            text=json.dumps({"test": "data", "value": 123}),
        )
        return [
            types.TextContent(type="text", text="Multiple content types test:"),
            types.ImageContent(type="image", data=PNG_B64, mime_type="image/png"),
            types.EmbeddedResource(type="resource", resource=resource),
        ]

    @srv.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Sends three info log notifications while it runs."""
        await ctx.info("Tool execution started")
        await asyncio.sleep(0.05)
        await ctx.info("Tool processing data")
        await asyncio.sleep(0.05)
        await ctx.info("Tool execution completed")
        return "Tool with logging executed successfully"

    @srv.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Reports progress 0, 50 and 100 of 100."""
        for step in (0, 50, 100):
            await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
            if step < 100:
                await asyncio.sleep(0.05)
        return "Progress tool completed"

    @srv.tool()
    def test_error_handling() -> str:
        """Always fails."""
        raise ToolError("This tool intentionally returns an error for testing")

    @srv.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Asks the client's LLM (sampling/createMessage) and returns its answer."""
        message = types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
        result = await ctx.session.create_message(
            messages=[message], max_tokens=100, related_request_id=ctx.request_context.request_id
        )
        content = result.content
        text = content.text if isinstance(content, types.TextContent) else str(content)
        return f"LLM response: {text}"

    async def _elicit(ctx: Context, message: str, schema: dict[str, Any]) -> str:
        result = await ctx.session.elicit_form(
            message, requested_schema=schema, related_request_id=ctx.request_context.request_id
        )
        return f"action={result.action}, content={json.dumps(result.content or {})}"

    @srv.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Asks the user (elicitation/create) for a username and an email."""
        schema = {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        }
        return "User response: " + await _elicit(ctx, message, schema)

    @srv.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Elicitation whose schema has defaults for every primitive type (SEP-1034)."""
        return "Elicitation completed: " + await _elicit(ctx, "Please provide user information", SEP1034_SCHEMA)

    @srv.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Elicitation with the five enum schema variants (SEP-1330)."""
        return "Elicitation completed: " + await _elicit(ctx, "Please pick values", SEP1330_SCHEMA)

    @srv.tool()
    async def test_reconnection(ctx: Context) -> str:
        """Closes its SSE stream mid-call; the result arrives after the client resumes (SEP-1699)."""
        await ctx.info("Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.2)
        await ctx.info("After reconnect")
        return "Reconnection test completed"

    @srv.tool()
    def json_schema_2020_12_tool(name: str | None = None, address: dict[str, Any] | None = None) -> str:
        """Tool with JSON Schema 2020-12 features"""
        return f"name={name} address={json.dumps(address)}"

    tool = srv._tool_manager.get_tool("json_schema_2020_12_tool")
    assert tool is not None
    tool.parameters = JSON_SCHEMA_2020_12  # advertised verbatim; the SDK still validates the arguments

    @srv.resource("test://static-text", mime_type="text/plain", description="A static text resource")
    def static_text() -> str:
        return "This is the content of the static text resource."

    @srv.resource("test://static-binary", mime_type="image/png", description="A static binary resource")
    def static_binary() -> bytes:
        return PNG

    @srv.resource("test://template/{id}/data", mime_type="application/json", description="A resource template")
    def template_data(id: str) -> str:
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @srv.resource("test://watched-resource", mime_type="text/plain", description="A resource to subscribe to")
    def watched() -> str:
        return "Watched resource content"

    @srv.prompt()
    def test_simple_prompt() -> str:
        """A simple prompt without arguments."""
        return "This is a simple prompt for testing."

    @srv.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> str:
        """A prompt with two required arguments."""
        return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"

    @srv.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[dict[str, Any]]:  # the wire name of the argument
        """A prompt embedding a resource."""
        resource = {"uri": resourceUri, "mimeType": "text/plain", "text": "Embedded resource content for testing."}
        return [
            {"role": "user", "content": {"type": "resource", "resource": resource}},
            {"role": "user", "content": {"type": "text", "text": "Please process the embedded resource above."}},
        ]

    @srv.prompt()
    def test_prompt_with_image() -> list[dict[str, Any]]:
        """A prompt with an image."""
        return [
            {"role": "user", "content": {"type": "image", "data": PNG_B64, "mimeType": "image/png"}},
            {"role": "user", "content": {"type": "text", "text": "Please analyze the image above."}},
        ]

    @srv.completion()
    async def complete(ref: Any, argument: types.CompletionArgument, context: Any) -> types.Completion:
        values = [v for v in ("paris", "park", "party") if v.startswith(argument.value)]
        return types.Completion(values=values, total=len(values), has_more=False)

    async def set_level(ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams) -> types.EmptyResult:
        return types.EmptyResult()

    async def subscribe(ctx: ServerRequestContext[Any], params: types.SubscribeRequestParams) -> types.EmptyResult:
        subscriptions.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any], params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        subscriptions.discard(str(params.uri))
        return types.EmptyResult()

    low = srv._lowlevel_server
    low.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    low.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    low.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
    return srv


def build_app() -> Starlette:
    # host="127.0.0.1" turns on the SDK's DNS-rebinding protection (loopback Host/Origin only).
    return build_server().streamable_http_app(event_store=MemoryEventStore(), retry_interval=100, host="127.0.0.1")


async def serve(port: int) -> None:
    config = uvicorn.Config(build_app(), host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    await uvicorn.Server(config).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="loopback port to listen on")
    where.add_argument("--stdio", action="store_true", help="speak MCP over stdin/stdout instead (one client)")
    args = parser.parse_args()
    if args.stdio:
        build_server().run("stdio")
    else:
        anyio.run(serve, args.port)


if __name__ == "__main__":
    main()
