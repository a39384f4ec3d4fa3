"""What a hostile client or a second user tries against the authorization server and the portal's
OAuth pages, and what the gateway answers."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.oauth.flow import call, new_person, register, run_oauth_portal
from tests.portal.harness import Portal
from tests.upstream_sdk import run_upstream

PRICES: dict[str, Any] = {"weather": {"tools": {"get_forecast": "5"}, "default": 0}}
PHISHING = "https://phish.example/login"


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    async with run_upstream(json_response=True) as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}, prices=PRICES) as p:
            yield p


def weather(portal: Portal) -> str:
    return portal.url("/weather/mcp")


async def test_an_erroneous_authorization_request_never_sends_a_signed_out_browser_to_the_client(
    portal: Portal,
) -> None:
    """RFC 9700 §4.11.2: an attacker registers a client whose redirect URI is a phishing page and
    sends a link to our issuer with a broken request; the browser must not bounce there unseen."""
    client = await register(portal, PHISHING)
    for resource, extra in (
        (weather(portal), {"response_type": "token"}),
        (weather(portal), {"code_challenge_method": "plain"}),
        ("https://x.example/mcp", {}),
    ):
        url = client.authorize_url(resource, **extra)
        async with aiohttp.ClientSession() as http, http.get(url, allow_redirects=False) as resp:
            location = resp.headers.get("Location", "")
        assert not location.startswith("https://phish.example"), (extra, location)
        async with aiohttp.ClientSession() as http, http.get(location, allow_redirects=False) as resp:
            assert resp.status == 303  # the consent page sends a stranger to sign in first
            assert urlsplit(resp.headers["Location"]).path == "/portal/login"


async def test_a_signed_in_person_sees_an_erroneous_request_refused_back_to_the_client(portal: Portal) -> None:
    person = await new_person(portal, "ann@example.com", "1")
    async with person.visitor:
        client = await register(portal)
        url = client.authorize_url(weather(portal), code_challenge_method="plain")
        async with person.visitor.http.get(url, allow_redirects=False) as resp:
            consent = resp.headers["Location"]
        async with person.visitor.http.get(consent, allow_redirects=False) as resp:
            assert resp.status == 302
            location = resp.headers["Location"]
    assert location.startswith(client.redirect_uri) and "error=invalid_request" in location


async def test_a_consent_form_posted_after_its_session_signed_out_grants_nothing(portal: Portal) -> None:
    person = await new_person(portal, "bea@example.com", "1")
    async with person.visitor:
        client = await register(portal)
        fields = await person.consent_form(client.authorize_url(weather(portal)))
        await person.visitor.get("/portal/account")  # the session's own form token
        status, _, _ = await person.visitor.post("/portal/logout", {})
        assert status == 303
        status, _ = await person.post_consent({**fields, "decision": "approve"})
        assert status == 403
    assert await portal.gw.ledger.list_keys("bea@example.com") == []


async def test_a_second_user_cannot_see_or_disconnect_the_first_users_application(portal: Portal) -> None:
    alice = await new_person(portal, "alice@example.com", "1")
    mallory = await new_person(portal, "mallory@example.com", "1")
    async with alice.visitor, mallory.visitor:
        client = await register(portal)
        status, tokens = await client.redeem(await client.code(alice, weather(portal)), weather(portal))
        assert status == 200
        _, page, _ = await alice.visitor.get("/portal/connections")
        found = re.search(r'data-grant-id="([^"]+)"', page)
        assert found is not None
        grant_id = found.group(1)
        _, page, _ = await mallory.visitor.get("/portal/connections")
        assert grant_id not in page and 'data-testid="no-connections"' in page
        status, _, _ = await mallory.visitor.post(f"/portal/connections/{grant_id}/revoke", {})
        assert status == 404
        _, page, _ = await mallory.visitor.get("/portal/keys")  # nor the grant's key in the key list
        assert "OAuth:" not in page
    assert (await call(weather(portal), tokens["access_token"]))[0] == 200


async def test_an_access_token_is_not_a_service_token_on_the_service_api(portal: Portal) -> None:
    person = await new_person(portal, "cy@example.com", "1")
    async with person.visitor:
        client = await register(portal)
        status, tokens = await client.redeem(await client.code(person, weather(portal)), weather(portal))
        assert status == 200
    headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    async with aiohttp.ClientSession() as http, http.get(portal.url("/v1/charges"), headers=headers) as resp:
        assert resp.status == 401
        assert tokens["access_token"] not in await resp.text()


@pytest.mark.parametrize(
    "host",
    [
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[64:ff9b::a00:1]",  # NAT64 (RFC 6052): 10.0.0.1 through the translator
        "[64:ff9b:1::a9fe:a9fe]",  # NAT64 local-use prefix: 169.254.169.254, the cloud metadata service
        "[2002:a00:1::1]",  # 6to4: 10.0.0.1
        "[::ffff:0:a00:1]",  # SIIT IPv4-translated: 10.0.0.1
        "[::a00:1]",  # IPv4-compatible (deprecated): 10.0.0.1
        "[fec0::1]",  # site-local (deprecated)
        "0x7f.1",  # 127.0.0.1 in the resolver's shorthand: resolved, then refused
    ],
)
async def test_a_client_metadata_url_at_a_private_address_written_another_way_is_refused(host: str) -> None:
    from gateway.oauth.clients import ClientRejected, MetadataFetcher

    fetcher = MetadataFetcher()
    try:
        with pytest.raises(ClientRejected, match="private or local"):
            await fetcher.client(f"https://{host}/client.json")
        with pytest.raises(ClientRejected):  # one decimal number: not even a URL aiohttp will fetch
            await fetcher.client("https://2130706433/client.json")
    finally:
        await fetcher.close()


async def test_the_authorization_pages_shown_to_a_person_carry_a_csp_and_cannot_be_framed(portal: Portal) -> None:
    person = await new_person(portal, "dee@example.com", "1")
    async with person.visitor:
        client = await register(portal)
        unknown = client.authorize_url(weather(portal), client_id="apc_unknown")
        async with person.visitor.http.get(unknown, allow_redirects=False) as resp:
            assert resp.status == 400 and resp.content_type == "text/html"
            problem = resp.headers
        async with person.visitor.http.get(client.authorize_url(weather(portal)), allow_redirects=False) as resp:
            consent_url = resp.headers["Location"]
        async with person.visitor.http.get(consent_url, allow_redirects=False) as resp:
            assert resp.status == 200
            consent = resp.headers
        async with person.visitor.http.post(portal.url("/oauth/authorize"), data={"csrf_token": "x"}) as resp:
            assert resp.status == 403
            refused = resp.headers
    for headers in (problem, consent, refused):
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    assert "script-src" not in consent["Content-Security-Policy"]  # default-src 'self': no inline script
