"""Client ID Metadata Documents fetched for real over https on loopback: the limits of the fetch."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.oauth.clients import MAX_DOCUMENT_BYTES, ClientRejected, MetadataFetcher
from tests.oauth.test_sdk_client import certificate

REDIRECT = "http://127.0.0.1/callback"


@pytest.fixture
async def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[str, dict[str, int]]]:
    cert, key = certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    hits: dict[str, int] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hits[name] = hits.get(name, 0) + 1
        url = str(request.url)
        doc = {"client_id": url, "client_name": name, "redirect_uris": [REDIRECT]}
        if name == "big":
            doc["padding"] = "x" * MAX_DOCUMENT_BYTES
        if name == "wrong":
            doc["client_id"] = url.replace("wrong", "other")
        if name == "secret":
            doc["token_endpoint_auth_method"] = "client_secret_basic"
        if name == "moved":
            raise web.HTTPFound("/c/ok")
        return web.json_response(doc, headers={"Cache-Control": "max-age=600"})

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_get("/c/{name}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await server.start()
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"https://127.0.0.1:{port}/c/", hits
    finally:
        await runner.cleanup()


@pytest.fixture
async def fetcher() -> AsyncIterator[MetadataFetcher]:
    allowed = MetadataFetcher(allowed_hosts=("127.0.0.1",))
    try:
        yield allowed
    finally:
        await allowed.close()


async def test_a_document_is_fetched_once_and_cached(
    site: tuple[str, dict[str, int]], fetcher: MetadataFetcher
) -> None:
    base, hits = site
    client = await fetcher.client(base + "ok")
    assert (client.client_id, client.client_name, client.redirect_uris, client.kind) == (
        base + "ok",
        "ok",
        (REDIRECT,),
        "cimd",
    )
    assert await fetcher.client(base + "ok") == client
    assert hits == {"ok": 1}


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("big", "larger than"),
        ("wrong", "not the URL it was fetched from"),
        ("secret", "token_endpoint_auth_method none"),
        ("moved", "HTTP 302"),  # redirects are not followed
    ],
)
async def test_documents_that_break_the_rules_are_refused(
    site: tuple[str, dict[str, int]], fetcher: MetadataFetcher, name: str, says: str
) -> None:
    base, hits = site
    with pytest.raises(ClientRejected, match=says):
        await fetcher.client(base + name)
    assert "ok" not in hits


async def test_only_https_urls_with_a_path_name_documents(fetcher: MetadataFetcher) -> None:
    for url in ("http://example.com/client.json", "https://example.com/", "https://user@example.com/c.json"):
        with pytest.raises(ClientRejected):
            await fetcher.client(url)
