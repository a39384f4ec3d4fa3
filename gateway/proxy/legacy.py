"""The 2024-11-05 HTTP+SSE transport: the GET stream carries the answers to the POSTs of its channel."""

from __future__ import annotations

import asyncio
from urllib.parse import urljoin

from aiohttp import web

from gateway.money import format_cents
from gateway.protocol import jsonrpc, sse
from gateway.protocol.sessions import MAX_CHANNEL_EVENTS, Forwarded, LegacyChannel
from gateway.proxy.admission import admit_all, forward_body, read_body
from gateway.proxy.exchange import TASK_METHODS, Context, Exchange, SessionNotFound, settle_call
from gateway.proxy.limits import TooManyRequests
from gateway.proxy.relay import open_upstream, relay_sse, stream_raw


def _gateway_prefix(ctx: Context) -> str:
    """The path prefix under which the client reached this server (keeps a path-embedded key)."""
    key_part = f"/k/{ctx.route.path_key}" if ctx.route.path_key else ""
    host = (ctx.request.headers.get("Host") or "").lower()
    host_routed = ctx.rt.hosts.get(host.rsplit(":", 1)[0] if host.count(":") == 1 else host)
    raw = ctx.request.rel_url.raw_path
    if host_routed == ctx.server.name and not raw.removeprefix(key_part).startswith(f"/{ctx.server.name}/"):
        return key_part
    return f"{key_part}/{ctx.server.name}"


async def legacy_stream(ctx: Context) -> web.StreamResponse:
    """GET /<server>/sse: relay the upstream's SSE stream, rewriting its ``endpoint`` event so the
    client's POSTs come back through the gateway, and billing the responses it carries."""
    rt, server = ctx.rt, ctx.server
    assert server.sse_upstream is not None
    ctx.fields["method"] = "sse"
    channel_id = rt.billing.new_call_id()
    exchange = Exchange(ctx.key, scope=f"c:{channel_id}")
    upstream = await open_upstream(ctx, "GET", server.sse_upstream, body=None, accept_sse=True)
    if upstream.status >= 300 or not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
        try:
            return await stream_raw(ctx, upstream)
        finally:
            upstream.release()

    inject: asyncio.Queue[bytes] = asyncio.Queue(MAX_CHANNEL_EVENTS)

    def rewrite(event: sse.Event) -> bytes | None:
        if exchange.channel is not None or event.name != "endpoint" or event.data is None:
            return None
        target = urljoin(server.sse_upstream or "", event.data.strip())
        exchange.channel = LegacyChannel(ctx.key.id, server.name, target, events=inject)
        rt.sessions.legacy[channel_id] = exchange.channel
        return event.with_data(f"{_gateway_prefix(ctx)}/messages?channel={channel_id}")

    try:
        return await relay_sse(ctx, upstream, exchange, rewrite=rewrite, inject=inject)
    finally:
        upstream.release()
        rt.sessions.legacy.pop(channel_id, None)
        if exchange.channel is not None:
            exchange.channel.closed = True  # a POST still on its way must not add to it now
            _void_channel(ctx, exchange, exchange.channel, list(exchange.channel.pending.items()))
        if exchange.charged:
            ctx.fields["charged_cents"] = format_cents(exchange.charged)


async def legacy_post(ctx: Context) -> web.StreamResponse:
    """POST to the rewritten endpoint: hold priced calls, forward, and expect the answers on the
    GET stream. Refusals are delivered on that stream too, as the upstream would."""
    rt = ctx.rt
    channel_id = ctx.request.query.get("channel", "")
    channel = rt.sessions.legacy.get(channel_id)
    if channel is None or channel.key_id != ctx.key.id or channel.server != ctx.server.name:
        raise SessionNotFound("Unknown or closed SSE session", hint="Reconnect to the SSE endpoint")
    if channel.events.qsize() > MAX_CHANNEL_EVENTS - rt.config.max_batch_items:  # room for a batch's refusals
        raise TooManyRequests(
            f"{channel.events.qsize()} events are waiting for this SSE session's stream, which is not being read",
            retry_after_s=1,
        )
    body = await read_body(ctx.request, rt.config, ctx.deadlines)
    exchange = Exchange(ctx.key, scope=f"c:{channel_id}", channel=channel)
    incoming, forwarded = await admit_all(ctx, body, exchange)
    if channel.closed:  # its stream ended while this body arrived or its holds were placed
        _void_channel(ctx, exchange, channel, list(exchange.requests.items()))
        raise SessionNotFound("The SSE session closed", hint="Reconnect to the SSE endpoint")
    for refusal in exchange.refusals:
        channel.events.put_nowait(sse.encode(jsonrpc.dumps(refusal).decode(), event="message"))
    if not forwarded:
        ctx.fields["outcome"] = "refused"
        return web.Response(status=202, text="Accepted")
    sent = list(exchange.requests.items())
    exchange.requests = {}  # answered on the GET stream, which now waits for them
    for upstream_id, request in sent:
        if not channel.expect(upstream_id, request):
            _void_channel(ctx, exchange, channel, [(upstream_id, request)])
    try:
        upstream = await open_upstream(ctx, "POST", channel.upstream_url, body=forward_body(incoming, forwarded))
    except BaseException:
        _void_channel(ctx, exchange, channel, sent)
        raise
    try:
        if upstream.status >= 300:
            _void_channel(ctx, exchange, channel, sent)
        return await stream_raw(ctx, upstream)
    finally:
        upstream.release()


def _void_channel(
    ctx: Context, exchange: Exchange, channel: LegacyChannel, requests: list[tuple[str, Forwarded]]
) -> None:
    """Stop waiting for these requests' answers on the channel; void the calls they held (a task's
    hold stays with its task)."""
    for upstream_id, request in requests:
        channel.pending.pop(upstream_id, None)
        ctx.rt.sessions.untrack(exchange.scope, request.client_id, upstream_id)
        if request.call is not None and request.method not in TASK_METHODS:
            settle_call(ctx, exchange, request.call, capture=False)
