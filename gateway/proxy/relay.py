"""Forwarding to the upstream and relaying its answer: untouched, as one JSON body, or event by event."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from gateway import addresses
from gateway.config import GatewayConfig
from gateway.errors import (
    UpstreamAnswerTooLarge,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.money import format_cents
from gateway.protocol import jsonrpc, sse
from gateway.proxy.answers import Capture, capture_delivered, delivery_failed, process_event, process_value
from gateway.proxy.deadlines import Deadlines
from gateway.proxy.exchange import CLIENT_GONE, UPSTREAMS, Context, Exchange, release_calls, settle_call
from gateway.proxy.headers import ForwardedFor, downstream_headers, upstream_headers
from gateway.proxy.upstream_client import UpstreamAnswer

_READ_CHUNK = 1 << 16  # bytes per read of an answer being gathered whole


def _max_answer_bytes(config: GatewayConfig) -> int:
    """The most an upstream's answer may hold in memory at once: a JSON answer, or one SSE event."""
    return config.max_body_bytes * 4


def _forwarded_for(request: web.Request, config: GatewayConfig) -> ForwardedFor:
    peer = request.remote
    trusted = addresses.trusted(peer, config.trusted_proxies)
    return ForwardedFor(
        client_ip=peer,
        proto=(request.headers.get("X-Forwarded-Proto") if trusted else None) or request.scheme,
        host=(request.headers.get("X-Forwarded-Host") if trusted else None) or request.headers.get("Host"),
        prior_chain=request.headers.get("X-Forwarded-For") if trusted else None,
    )


async def open_upstream(
    ctx: Context, method: str, url: str, *, body: bytes | None, accept_sse: bool = False
) -> UpstreamAnswer:
    server, request = ctx.server, ctx.request
    headers = upstream_headers(
        request.headers, forwarded=_forwarded_for(request, ctx.rt.config), extra=server.upstream_headers
    )
    if accept_sse:
        headers["Accept"] = "text/event-stream"
    if ctx.upstream_session is not None:
        headers["Mcp-Session-Id"] = ctx.upstream_session
    started = time.perf_counter()
    try:
        async with ctx.deadlines.timeout(server.read_timeout_s):
            upstream = await request.app[UPSTREAMS][server.name].request(
                method,
                url,
                data=body,
                headers=headers,
                key=ctx.key.id,  # one key may hold only its fair share of the server's connections
                key_share=server.max_key_share,
                queue_timeout_s=server.upstream_queue_timeout_s,
            )
    except TimeoutError:
        raise UpstreamTimeout(f"Server {server.name!r} did not answer within {server.read_timeout_s:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamError(f"Server {server.name!r} is unreachable ({type(exc).__name__})") from None
    ctx.rt.metrics.observe_upstream(server.name, time.perf_counter() - started)
    ctx.fields["upstream_status"] = upstream.status
    return upstream


async def forward_request(ctx: Context, exchange: Exchange, *, body: bytes | None) -> web.StreamResponse:
    rt, request, server, fields = ctx.rt, ctx.request, ctx.server, ctx.fields
    url = server.upstream or ""  # a stdio server (server.stdio) needs no URL
    if request.rel_url.query_string:
        url = f"{url}?{request.rel_url.query_string}"
    upstream: UpstreamAnswer | None = None
    try:
        upstream = await open_upstream(ctx, request.method, url, body=body)
        if request.method == "DELETE" and upstream.status < 300 and exchange.session_id is not None:
            for call in rt.sessions.drop(exchange.session_id):
                settle_call(ctx, exchange, call, capture=False)
        if upstream.status >= 300:
            exchange.billable = False  # nothing in an HTTP error is billed (nor delivered, if priced)
            if upstream.status >= 500:
                fields["outcome"] = "upstream_error"
        content_type = upstream.headers.get("Content-Type", "").lower()
        answers = bool(exchange.requests or exchange.refusals)
        if content_type.startswith("text/event-stream") and (answers or request.method == "GET"):
            # A GET stream may carry any response of the session (a resumed stream): always read.
            return await relay_sse(ctx, upstream, exchange)
        if answers and (exchange.billable or content_type.startswith("application/json")):
            return await _relay_json(ctx, upstream, exchange)
        release_calls(ctx, exchange)
        return await stream_raw(ctx, upstream)
    except asyncio.CancelledError:
        exchange.client_gone = True
        raise
    finally:
        release_calls(ctx, exchange)
        if upstream is not None:
            upstream.release()
        if exchange.charged:
            fields["charged_cents"] = format_cents(exchange.charged)
        if "outcome" not in fields:
            fields["outcome"] = "charged" if exchange.charged else ("refused" if exchange.refusals else "ok")


def _client_headers(ctx: Context, upstream: UpstreamAnswer) -> Any:
    """The upstream's response headers for the client, with its session id signed to the caller's key."""
    headers = downstream_headers(upstream.headers.items())
    session = headers.get("Mcp-Session-Id")
    if session is not None:
        headers["Mcp-Session-Id"] = ctx.rt.signer.wrap(session, ctx.key.id)
    return headers


def _arrived(upstream: UpstreamAnswer) -> bytes | None:
    """The whole response body when it has already arrived, else None. A small answer usually comes
    in the same packets as its headers: then it is taken as it is, with no wait and so no timer."""
    content = upstream.content
    if content.is_eof() and content.exception() is None:
        return content.read_nowait()
    return None


async def _read_within(upstream: UpstreamAnswer, limit: int, server: str) -> bytes:
    """The whole body, refused (UpstreamAnswerTooLarge) as soon as it says or proves itself larger
    than ``limit`` bytes: an upstream's endless or huge answer never fills the gateway's memory."""
    declared = upstream.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UpstreamAnswerTooLarge(f"Server {server!r} answered with {declared} bytes, over the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while chunk := await upstream.content.read(_READ_CHUNK):
        size += len(chunk)
        if size > limit:
            raise UpstreamAnswerTooLarge(f"Server {server!r} answered with more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _whole_answer(ctx: Context, upstream: UpstreamAnswer) -> web.Response | None:
    """The upstream's answer relayed untouched in one response, if its body has already arrived."""
    body = _arrived(upstream)
    if body is None:
        return None
    return web.Response(
        status=upstream.status, reason=upstream.reason, body=body, headers=_client_headers(ctx, upstream)
    )


async def stream_raw(ctx: Context, upstream: UpstreamAnswer) -> web.StreamResponse:
    """Relay status, headers and body untouched: in one response when the body has already arrived,
    else chunk by chunk as they arrive."""
    whole = _whole_answer(ctx, upstream)
    if whole is not None:
        return whole
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(_client_headers(ctx, upstream))
    content_length = upstream.headers.get("Content-Length")
    if content_length is not None:
        response.content_length = int(content_length)
    await response.prepare(ctx.request)
    try:
        async for chunk in _chunks(upstream, None, ctx.rt.config.stream_idle_timeout_s, ctx.deadlines):
            assert isinstance(chunk, bytes)
            await response.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
        ctx.fields["outcome"] = "upstream_broke_stream"
        return response
    except TimeoutError:
        ctx.fields["outcome"] = "stream_idle_timeout"
        return response
    await response.write_eof()
    return response


async def _relay_json(ctx: Context, upstream: UpstreamAnswer, exchange: Exchange) -> web.StreamResponse:
    server = ctx.server
    limit = _max_answer_bytes(ctx.rt.config)  # a JSON answer is read whole: bounded as one SSE event is
    raw = _arrived(upstream)
    if raw is not None and len(raw) > limit:
        raise UpstreamAnswerTooLarge(f"Server {server.name!r} answered with more than the limit of {limit} bytes")
    if raw is None:
        try:
            async with ctx.deadlines.timeout(server.read_timeout_s):
                raw = await _read_within(upstream, limit, server.name)
        except TimeoutError:
            raise UpstreamTimeout(
                f"Server {server.name!r} did not finish its answer within {server.read_timeout_s:g}s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise UpstreamError(f"Server {server.name!r} broke off its answer ({type(exc).__name__})") from None
    to_capture: list[Capture] = []
    if raw.strip():
        try:
            value = jsonrpc.loads(raw)
        except ValueError:
            value = None  # not JSON: relayed as it is, and nothing is captured
        if value is not None:
            changed = process_value(ctx, value, exchange, to_capture)
            if exchange.refusals:
                value = (value if isinstance(value, list) else [value]) + exchange.refusals
                changed = True
            if changed:
                raw = jsonrpc.dumps(value)
    elif exchange.refusals:
        raw = jsonrpc.dumps(exchange.refusals)
    # Written here, not by aiohttp after the handler returns: a call is captured only once its
    # success has been written to the client. Headers and body go out in one write.
    response = web.Response(
        status=upstream.status, reason=upstream.reason, body=raw, headers=_client_headers(ctx, upstream)
    )
    try:
        await response.prepare(ctx.request)
        await response.write_eof()
    except BaseException:
        delivery_failed(ctx, exchange, to_capture)
        raise
    capture_delivered(ctx, exchange, to_capture)
    return response


async def relay_sse(
    ctx: Context,
    upstream: UpstreamAnswer,
    exchange: Exchange,
    *,
    rewrite: Callable[[sse.Event], bytes | None] | None = None,
    inject: asyncio.Queue[bytes] | None = None,
) -> web.StreamResponse:
    """Relay an SSE stream event by event, giving responses their client's id back and settling held
    calls on the events that answer them. ``rewrite`` may replace an event; ``inject`` carries
    events the gateway adds (legacy SSE)."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(_client_headers(ctx, upstream))
    await response.prepare(ctx.request)
    max_event = _max_answer_bytes(ctx.rt.config)
    parser = sse.Parser(max_event_bytes=max_event)
    try:
        for refusal in exchange.refusals:
            await response.write(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
        async for chunk in _chunks(upstream, inject, ctx.rt.config.stream_idle_timeout_s, ctx.deadlines):
            if isinstance(chunk, _Injected):
                await response.write(chunk.data)
                continue
            for event in parser.feed(chunk):
                out = rewrite(event) if rewrite is not None else None
                to_capture: list[Capture] = []
                if out is None:
                    out = process_event(ctx, event, exchange, to_capture)
                try:
                    await response.write(out)
                except BaseException:
                    delivery_failed(ctx, exchange, to_capture)
                    raise
                capture_delivered(ctx, exchange, to_capture)
    except CLIENT_GONE:
        exchange.client_gone = True
        ctx.fields["outcome"] = "client_gone"
        return response
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, sse.EventTooLarge) as exc:
        ctx.fields["outcome"] = "upstream_broke_stream"
        ctx.fields["error"] = type(exc).__name__
        return response
    except TimeoutError:
        ctx.fields["outcome"] = "stream_idle_timeout"
        return response
    if parser.pending():
        await response.write(parser.pending())
    await response.write_eof()
    return response


@dataclass(slots=True, frozen=True)
class _Injected:
    data: bytes


async def _chunks(
    upstream: UpstreamAnswer, inject: asyncio.Queue[bytes] | None, idle_s: float, deadlines: Deadlines
) -> Any:
    """Upstream body chunks as they arrive, merged with injected events when there is an injection
    queue. Raises TimeoutError when the upstream sends nothing for ``idle_s``."""
    if inject is None:
        while True:
            async with deadlines.timeout(idle_s):
                chunk = await upstream.content.readany()
            if not chunk:
                return
            yield chunk
    reader = asyncio.ensure_future(upstream.content.readany())
    waiter = asyncio.ensure_future(inject.get())
    try:
        while True:
            done, _ = await asyncio.wait({reader, waiter}, timeout=idle_s, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise TimeoutError
            if waiter in done:
                yield _Injected(waiter.result())
                waiter = asyncio.ensure_future(inject.get())
            if reader in done:
                chunk = reader.result()
                if not chunk:
                    return
                yield chunk
                reader = asyncio.ensure_future(upstream.content.readany())
    finally:
        reader.cancel()
        waiter.cancel()
