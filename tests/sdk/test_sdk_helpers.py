"""The SDK's key extraction helpers and amount handling, on real request objects."""

from __future__ import annotations

from decimal import Decimal

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from starlette.requests import Request as StarletteRequest

from gateway.sdk import cents_text, key_from_asgi, key_from_headers, key_from_request


def test_keys_come_from_bearer_or_x_api_key_in_any_header_mapping() -> None:
    assert key_from_headers({"authorization": "Bearer ap_abc"}) == "ap_abc"
    assert key_from_headers({"X-API-Key": " ap_def "}) == "ap_def"
    assert key_from_headers({"Authorization": "Basic xyz"}) is None
    assert key_from_headers({}) is None
    assert key_from_headers(None) is None


async def test_the_key_is_read_from_an_aiohttp_request() -> None:
    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(key_from_request(request))
        return web.Response()

    app = web.Application()
    app.router.add_get("/", handler)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(server.make_url("/"), headers={"Authorization": "Bearer ap_x"}),
        ):
            pass
    finally:
        await server.close()
    assert seen == ["ap_x"]


def test_the_key_is_read_from_an_asgi_scope_and_a_starlette_request() -> None:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"x-api-key", b"ap_scope")]}
    assert key_from_asgi(scope) == "ap_scope"
    assert key_from_asgi(StarletteRequest(scope)) == "ap_scope"


def test_amounts_are_exact_and_floats_are_refused() -> None:
    assert cents_text(5) == "5"
    assert cents_text(Decimal("2.50")) == "2.50"
    assert cents_text(" 0.125 ") == "0.125"
    with pytest.raises(TypeError):
        cents_text(0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        cents_text(True)
