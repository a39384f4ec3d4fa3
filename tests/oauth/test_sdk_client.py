"""The official SDK's OAuth client connects to a priced server through the gateway by URL alone."""

from __future__ import annotations

import re
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from gateway.money import parse_cents
from gateway.oauth.clients import ClientRejected, MetadataFetcher
from tests.ledger.conftest import StoreSpec
from tests.oauth.flow import REDIRECT_URI, MemoryStorage, call, new_person, oauth_client, provider, run_oauth_portal
from tests.upstream_sdk import run_upstream


async def test_the_sdk_client_registers_signs_in_and_its_priced_call_is_charged_to_the_consenting_user(
    tmp_path: Path,
) -> None:
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            person = await new_person(portal, "alice@example.com", "100")
            url = portal.url("/weather/mcp")
            storage = MemoryStorage()
            async with oauth_client(provider(person, url, storage), url) as client:
                result = await client.call_tool("get_forecast", {"city": "Oslo"})
            assert not result.is_error
            await portal.gw.settled()
            assert await portal.gw.balance("alice@example.com") == parse_cents("95")
            assert upstream.log.completed == ["get_forecast"]
            assert storage.tokens is not None and storage.tokens.access_token.startswith("apat_")
            assert storage.client_info is not None and storage.client_info.client_id.startswith("apc_")


async def test_the_sdk_client_refreshes_its_token_and_a_revoked_grant_stops_its_tokens(tmp_path: Path) -> None:
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            person = await new_person(portal, "bob@example.com", "100")
            url = portal.url("/weather/mcp")
            storage = MemoryStorage()
            auth = provider(person, url, storage)
            async with oauth_client(auth, url) as client:
                await client.call_tool("get_forecast", {"city": "Oslo"})
                first = storage.tokens
                assert first is not None
                auth.context.token_expiry_time = time.time() - 1  # as if an hour went by
                await client.call_tool("get_forecast", {"city": "Rome"})
                second = storage.tokens
                assert second is not None
                assert second.access_token != first.access_token and second.refresh_token != first.refresh_token
            assert len(person.urls) == 1  # one sign-in: the second call refreshed
            await portal.gw.settled()
            assert await portal.gw.balance("bob@example.com") == parse_cents("90")
            assert (await call(url, first.access_token))[0] != 401  # an access token lives its hour
            assert storage.client_info is not None
            async with aiohttp.ClientSession() as http:
                form = {"token": second.refresh_token or "", "client_id": storage.client_info.client_id}
                async with http.post(portal.url("/oauth/revoke"), data=form) as resp:
                    assert resp.status == 200
            for token in (first.access_token, second.access_token):
                status, headers, _ = await call(url, token)
                assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_disconnecting_an_application_in_the_portal_stops_its_tokens(tmp_path: Path) -> None:
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            person = await new_person(portal, "carol@example.com", "100", spend_limit_cents="50")
            url = portal.url("/weather/mcp")
            storage = MemoryStorage()
            async with oauth_client(provider(person, url, storage), url) as client:
                await client.call_tool("get_forecast", {"city": "Oslo"})
            keys = await portal.gw.ledger.list_keys("carol@example.com")
            assert [(k.server, k.spend_limit, k.prefix[:5], k.name) for k in keys] == [
                ("weather", parse_cents("50"), "apoa_", "OAuth: SDK test client")
            ]
            status, text, _ = await person.visitor.get("/portal/connections")
            assert status == 200 and "SDK test client" in text
            grant_id = re.search(r'data-grant-id="([^"]+)"', text)
            assert grant_id is not None
            status, _, resp = await person.visitor.post(f"/portal/connections/{grant_id.group(1)}/revoke")
            assert status == 303 and resp.headers["Location"].endswith("/portal/connections?done=revoked")
            assert storage.tokens is not None
            assert (await call(url, storage.tokens.access_token))[0] == 401


async def test_the_sdk_client_identified_by_a_client_metadata_document_connects(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = certificate(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the gateway's fetch trusts the test's certificate
    async with run_upstream() as upstream, serve_document(cert, key) as document:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            person = await new_person(portal, "dan@example.com", "100")
            url = portal.url("/weather/mcp")
            storage = MemoryStorage()
            async with oauth_client(provider(person, url, storage, metadata_url=document.url), url) as client:
                result = await client.call_tool("get_forecast", {"city": "Oslo"})
            assert not result.is_error
            assert storage.client_info is not None and storage.client_info.client_id == document.url
            assert document.fetches == 1
            await portal.gw.settled()
            assert await portal.gw.balance("dan@example.com") == parse_cents("95")


async def test_the_metadata_fetch_refuses_loopback_unless_the_host_is_allowed(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path)
    async with serve_document(cert, key, host="localhost") as document:
        guarded = MetadataFetcher()
        try:
            with pytest.raises(ClientRejected, match="private or local address"):
                await guarded.client(document.url)
            with pytest.raises(ClientRejected, match="private or local address"):
                await guarded.client(document.url.replace("localhost", "127.0.0.1"))
        finally:
            await guarded.close()
        assert document.fetches == 0


def certificate(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost."""
    cert, key = tmp / "cimd-cert.pem", tmp / "cimd-key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    files = ["-keyout", str(key), "-out", str(cert)]
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject, *files]
    subprocess.run(cmd, check=True, capture_output=True)
    return cert, key


@dataclass
class Document:
    url: str
    fetches: int = 0


@asynccontextmanager
async def serve_document(cert: Path, key: Path, *, host: str = "127.0.0.1") -> AsyncIterator[Document]:
    """A client metadata document served over HTTPS on a loopback port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    document = Document(url="")

    async def handler(request: web.Request) -> web.Response:
        document.fetches += 1
        return web.json_response(
            {
                "client_id": document.url,
                "client_name": "CIMD test client",
                "redirect_uris": [REDIRECT_URI],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }
        )

    app = web.Application()
    app.router.add_get("/oauth/client.json", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    document.url = f"https://{host}:{port}/oauth/client.json"
    try:
        yield document
    finally:
        await runner.cleanup()


async def test_a_signed_out_person_signs_in_and_comes_back_to_the_consent_page(tmp_path: Path) -> None:
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            person = await new_person(portal, "fay@example.com", "100")
            person.visitor.http.cookie_jar.clear()  # signed out
            url = portal.url("/weather/mcp")
            async with oauth_client(provider(person, url, MemoryStorage()), url) as client:
                assert not (await client.call_tool("get_forecast", {"city": "Oslo"})).is_error
            for evil in ("//evil.example/x", "https://evil.example/", "/portal\\\\@evil.example"):
                status, _, resp = await person.visitor.get("/portal/login?next=" + quote(evil, safe=""))
                assert status in (200, 303) and "evil" not in resp.headers.get("Location", "")


async def test_the_whole_flow_works_on_postgresql_too(tmp_path: Path) -> None:
    spec = StoreSpec.fresh("postgres", tmp_path)
    try:
        async with run_upstream() as upstream:
            database = f"{spec.location}?schema={spec.schema}"
            async with run_oauth_portal(tmp_path, {"weather": upstream.url}, database=database) as portal:
                person = await new_person(portal, "jo@example.com", "100")
                url = portal.url("/weather/mcp")
                storage = MemoryStorage()
                auth = provider(person, url, storage)
                async with oauth_client(auth, url) as client:
                    await client.call_tool("get_forecast", {"city": "Oslo"})
                    auth.context.token_expiry_time = time.time() - 1
                    await client.call_tool("get_forecast", {"city": "Rome"})
                await portal.gw.settled()
                assert await portal.gw.balance("jo@example.com") == parse_cents("90")
                assert len(person.urls) == 1
    finally:
        await spec.drop()
