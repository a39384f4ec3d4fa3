"""The reference pass-through: what a plain aiohttp reverse proxy costs, with no auth, no pricing and
no ledger. Default event loop, one pooled client session (keep-alive to the upstream), request and
response bodies forwarded as bytes (no JSON work at all; it would be stdlib json if it had any),
hop-by-hop headers dropped, SSE relayed chunk by chunk as it arrives.

Run: ``python -m bench.reference --port 8100 --upstream http://127.0.0.1:9000/mcp``.
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web

HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "server",
        "date",
    }
)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read() if request.body_exists else None
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    session = request.app[SESSION]
    async with session.request(request.method, request.app[UPSTREAM], data=body, headers=headers) as upstream:
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP}
        if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        payload = await upstream.read()
        return web.Response(status=upstream.status, body=payload, headers=out_headers)


async def _session(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.TCPConnector(limit=0)
    app[SESSION] = aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
    )
    yield
    await app[SESSION].close()


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(
        make_app(args.upstream),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        backlog=4096,
        shutdown_timeout=1,
    )


if __name__ == "__main__":
    main()
