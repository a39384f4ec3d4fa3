"""The MCP reverse-proxy handler: authenticate → price → hold → forward → relay → capture/void."""

from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

from gateway.addresses import client_address
from gateway.config import GatewayConfig, ServerConfig
from gateway.errors import (
    AuthError,
    InvalidToken,
    MethodNotAllowed,
    MissingKey,
    OriginForbidden,
    UnknownServer,
)
from gateway.keys import key_from_headers
from gateway.oauth import metadata
from gateway.protocol import jsonrpc
from gateway.proxy.admission import admit_all, forward_body, read_body
from gateway.proxy.auth import ACCESS_TOKEN_PREFIX
from gateway.proxy.exchange import DEADLINES, LOG_FIELDS, ROUTER, Context, Exchange, SessionNotFound, id_scope
from gateway.proxy.legacy import legacy_post, legacy_stream
from gateway.proxy.relay import forward_request
from gateway.proxy.routing import Route, host_name
from gateway.runtime import RUNTIME

_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


async def handle(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME]
    fields = request[LOG_FIELDS]
    headers = request.headers
    route = request.app[ROUTER].resolve(headers.get("Host"), request.rel_url.raw_path)
    server = rt.config.servers[route.server]
    fields["server"] = server.name
    origin = headers.get("Origin")
    if origin is not None:
        _check_origin(origin, server, rt.config)
    try:
        if route.path_key is not None and route.path_key.startswith(ACCESS_TOKEN_PREFIX):
            raise InvalidToken(
                "An OAuth access token is never accepted in the URL", hint="Send it as 'Authorization: Bearer …'"
            )
        key = await rt.auth.authenticate(
            route.path_key or key_from_headers(headers),
            server.name,
            client=lambda: client_address(request.remote, headers.get("X-Forwarded-For"), rt.config.trusted_proxies),
        )
    except AuthError as exc:
        if rt.oauth is not None and exc.http_status == 401:
            exc.challenge = _challenge(request, route, exc)
        raise
    fields["key"] = key.prefix
    if server.upstream is None and server.stdio is None:
        raise UnknownServer(
            f"Server {server.name!r} is integrated through the AgentPay SDK and has no MCP endpoint here",
            hint="Call the developer's own server URL",
        )
    rt.limits.acquire(key.id)
    try:
        return await _dispatch(Context(request, rt, route, server, key, fields, request.app[DEADLINES]))
    finally:
        rt.limits.release(key.id)


async def _dispatch(ctx: Context) -> web.StreamResponse:
    request, rt, route, key, fields = ctx.request, ctx.rt, ctx.route, ctx.key, ctx.fields
    if route.endpoint != "mcp" and ctx.server.stdio is not None:
        raise UnknownServer(
            f"Server {ctx.server.name!r} is a stdio server run by the gateway: it is served over Streamable HTTP only",
            hint=f"Use /{ctx.server.name}/mcp (the 2024-11-05 HTTP+SSE endpoints are for HTTP upstreams)",
        )
    if route.endpoint == "sse":
        if request.method != "GET":
            raise MethodNotAllowed(
                "The SSE endpoint takes GET", allow="GET", hint="POST messages to the endpoint the stream announces"
            )
        return await legacy_stream(ctx)
    if route.endpoint == "messages":
        if request.method != "POST":
            raise MethodNotAllowed("The messages endpoint takes POST", allow="POST")
        return await legacy_post(ctx)
    client_session = request.headers.get("Mcp-Session-Id")
    session_id = None
    if client_session is not None:
        session_id = rt.signer.unwrap(client_session, key.id)
        if session_id is None:  # opened with another key, forged, or from another deployment
            raise SessionNotFound("Session not found", hint="Start a new session (initialize) with your own key")
        ctx.upstream_session = session_id
    if request.method == "POST":
        return await _post(ctx, session_id)
    if request.method in ("GET", "DELETE"):
        fields["method"] = request.method
        return await forward_request(ctx, Exchange(key, session_id, scope=id_scope(key, session_id)), body=None)
    raise MethodNotAllowed(f"Method {request.method} is not supported on an MCP endpoint", allow="POST, GET, DELETE")


def _check_origin(origin: str, server: ServerConfig, config: GatewayConfig) -> None:
    if origin.lower().rstrip("/") in config.allowed_origins:
        return
    try:
        host = urlsplit(origin).hostname
    except ValueError:  # not even a URL ("http://[::1")
        host = None
    if host is not None and (host in _LOOPBACK or host in server.hosts):
        return
    raise OriginForbidden(
        f"Requests from origin {origin!r} are not allowed",
        hint="Add the origin to allowed_origins in the gateway config if it is legitimate",
    )


async def _post(ctx: Context, session_id: str | None) -> web.StreamResponse:
    body = await read_body(ctx.request, ctx.rt.config, ctx.deadlines)
    exchange = Exchange(ctx.key, session_id, scope=id_scope(ctx.key, session_id))
    incoming, forwarded = await admit_all(ctx, body, exchange)
    if not forwarded:
        ctx.fields["outcome"] = "refused"
        value = exchange.refusals if incoming.is_batch else exchange.refusals[0]
        return web.Response(body=jsonrpc.dumps(value), content_type="application/json")
    return await forward_request(ctx, exchange, body=forward_body(incoming, forwarded))


def _challenge(request: web.Request, route: Route, exc: AuthError) -> str:
    """``Bearer resource_metadata="…"``: where an OAuth client finds how to sign in for this server."""
    rt = request.app[RUNTIME]
    origin = metadata.public_origin(request, rt.config)
    host = host_name(request.headers.get("Host"))
    host_routed = host is not None and rt.hosts.get(host) == route.server
    path = metadata.resource_path(route, request.rel_url.raw_path, host_routed)
    error = None if isinstance(exc, MissingKey) else "invalid_token"
    return metadata.challenge(f"{origin}{metadata.PRM_PATH}{path}", error=error)
