"""What the authorization server and the proxy refuse: each refusal an attacker would try."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from gateway.proxy.auth import Authenticator
from tests.fault_upstream import run_fault_upstream
from tests.oauth.flow import REDIRECT_URI, Person, RawClient, call, new_person, register, run_oauth_portal
from tests.portal.harness import Portal
from tests.upstream_sdk import run_upstream

PRICES: dict[str, Any] = {
    "weather": {"tools": {"get_forecast": "5"}, "default": 0},
    "maps": {"tools": {"get_forecast": "7"}, "default": 0},
}


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    async with run_upstream(json_response=True) as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url, "maps": upstream.url}, prices=PRICES) as p:
            yield p


@pytest.fixture
async def alice(portal: Portal) -> AsyncIterator[Person]:
    person = await new_person(portal, "alice@example.com", "100")
    async with person.visitor:
        yield person


def weather(portal: Portal) -> str:
    return portal.url("/weather/mcp")


async def test_a_wrong_pkce_verifier_is_refused_and_burns_the_code(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    code = await client.code(alice, weather(portal))
    status, body = await client.redeem(code, weather(portal), code_verifier="x" * 64)
    assert (status, body["error"]) == (400, "invalid_grant")
    status, body = await client.redeem(code, weather(portal))  # the right verifier, too late
    assert (status, body["error"]) == (400, "invalid_grant")


async def test_a_code_redeemed_twice_is_refused_and_revokes_what_the_first_redemption_gave(
    portal: Portal, alice: Person
) -> None:
    client = await register(portal)
    code = await client.code(alice, weather(portal))
    status, tokens = await client.redeem(code, weather(portal))
    assert status == 200
    assert (await call(weather(portal), tokens["access_token"]))[0] != 401
    status, body = await client.redeem(code, weather(portal))
    assert (status, body["error"]) == (400, "invalid_grant")
    status, headers, _ = await call(weather(portal), tokens["access_token"])
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_a_code_is_refused_for_another_client_and_for_another_resource(portal: Portal, alice: Person) -> None:
    client, thief = await register(portal), await register(portal)
    code = await client.code(alice, weather(portal))
    thief.verifier = client.verifier  # even knowing the verifier
    status, body = await thief.redeem(code, weather(portal))
    assert (status, body["error"]) == (400, "invalid_grant")
    code = await client.code(alice, weather(portal))
    status, body = await client.redeem(code, portal.url("/maps/mcp"))
    assert (status, body["error"]) == (400, "invalid_target")


async def test_an_unregistered_redirect_uri_is_never_redirected_to(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    url = client.authorize_url(weather(portal), redirect_uri="https://evil.example/callback")
    async with alice.visitor.http.get(url, allow_redirects=False) as resp:
        assert resp.status == 400
        assert "Location" not in resp.headers
        assert "redirect_uri" in await resp.text()
    # loopback redirects match on any port (RFC 8252), nothing else does
    loopback = await register(portal, "http://127.0.0.1/callback")
    url = loopback.authorize_url(weather(portal), redirect_uri="http://127.0.0.1:4321/callback")
    async with alice.visitor.http.get(url, allow_redirects=False) as resp:
        assert resp.status == 303
    url = loopback.authorize_url(weather(portal), redirect_uri="http://127.0.0.1:4321/other")
    async with alice.visitor.http.get(url, allow_redirects=False) as resp:
        assert resp.status == 400


async def test_a_reused_refresh_token_revokes_the_whole_grant(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    status, first = await client.redeem(await client.code(alice, weather(portal)), weather(portal))
    assert status == 200
    status, second = await client.token(grant_type="refresh_token", refresh_token=first["refresh_token"])
    assert status == 200 and second["refresh_token"] != first["refresh_token"]
    assert (await call(weather(portal), second["access_token"]))[0] != 401
    status, body = await client.token(grant_type="refresh_token", refresh_token=first["refresh_token"])  # stolen copy
    assert (status, body["error"]) == (400, "invalid_grant")
    assert (await call(weather(portal), second["access_token"]))[0] == 401  # the grant is gone
    status, body = await client.token(grant_type="refresh_token", refresh_token=second["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    keys = await portal.gw.ledger.list_keys("alice@example.com")
    assert [k.revoked_at is not None for k in keys] == [True]  # the grant's key is revoked with it


async def test_a_token_for_one_server_is_refused_on_another_and_never_taken_from_the_url(
    portal: Portal, alice: Person
) -> None:
    client = await register(portal)
    status, tokens = await client.redeem(await client.code(alice, weather(portal)), weather(portal))
    assert status == 200
    status, headers, _ = await call(portal.url(f"/k/{tokens['access_token']}/weather/mcp"), None)
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert tokens["access_token"] not in headers["WWW-Authenticate"]
    status, _, body = await call(portal.url("/maps/mcp"), tokens["access_token"])
    assert status == 403 and "wrong_server" in body


async def test_an_expired_access_token_is_refused_as_invalid(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    status, tokens = await client.redeem(await client.code(alice, weather(portal)), weather(portal))
    assert status == 200
    rt = portal.gw.rt
    assert rt.oauth is not None
    later = time.time() + rt.config.oauth.access_token_ttl_s + 1
    rt.auth = Authenticator(rt.ledger, cache_s=0, tokens=rt.oauth.store, wall_clock=lambda: later)
    status, headers, _ = await call(weather(portal), tokens["access_token"])
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Bearer resource_metadata="')
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_a_consent_post_without_its_csrf_token_is_refused(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    fields = await alice.consent_form(client.authorize_url(weather(portal)))
    assert fields.pop("csrf_token")
    status, _ = await alice.post_consent({**fields, "decision": "approve"})
    assert status == 403
    status, _ = await alice.post_consent({**fields, "decision": "approve", "csrf_token": "forged.token"})
    assert status == 403
    assert await portal.gw.ledger.list_keys("alice@example.com") == []  # nothing was granted


async def test_a_consent_ticket_is_bound_to_the_request_it_was_shown_for(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    fields = await alice.consent_form(client.authorize_url(weather(portal)))
    fields["resource"] = portal.url("/maps/mcp")  # swap the server under the person's approval
    status, _ = await alice.post_consent({**fields, "decision": "approve"})
    assert status == 403


async def test_a_client_metadata_document_at_a_private_address_is_not_fetched(portal: Portal, alice: Person) -> None:
    for client_id in ("https://10.0.0.1/client.json", "https://localhost/client.json", "http://example.com/c.json"):
        from urllib.parse import urlencode

        query = urlencode(
            {
                "response_type": "code",
                "client_id": client_id,
                "redirect_uri": REDIRECT_URI,
                "code_challenge": "a" * 43,
                "code_challenge_method": "S256",
                "resource": weather(portal),
            }
        )
        async with alice.visitor.http.get(portal.url("/oauth/authorize?" + query), allow_redirects=False) as resp:
            assert resp.status == 400, client_id
            assert "Location" not in resp.headers


async def test_denying_consent_redirects_with_access_denied_and_grants_nothing(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    alice.decision = "deny"
    location = await alice.answer(client.authorize_url(weather(portal)))
    assert location.startswith(REDIRECT_URI + "?") and "error=access_denied" in location and "iss=" in location
    assert await portal.gw.ledger.list_keys("alice@example.com") == []


async def test_pkce_is_required(portal: Portal, alice: Person) -> None:
    client = await register(portal)
    url = client.authorize_url(weather(portal), code_challenge_method="plain")
    async with alice.visitor.http.get(url, allow_redirects=False) as resp:
        assert resp.status == 303  # to the consent page: the error goes back once she is signed in
        consent = resp.headers["Location"]
    async with alice.visitor.http.get(consent, allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith(client.redirect_uri)
        assert "error=invalid_request" in resp.headers["Location"]


async def test_an_access_token_never_reaches_the_upstream(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        prices = {"weather": {"tools": {"*": "5", "echo": 0}, "default": 0}}
        async with run_oauth_portal(tmp_path, {"weather": url}, prices=prices) as portal:
            person = await new_person(portal, "ivy@example.com", "100")
            async with person.visitor:
                client = await register(portal)
                status, tokens = await client.redeem(await client.code(person, weather(portal)), weather(portal))
            assert status == 200
            status, _, _ = await call(weather(portal), tokens["access_token"], tool="echo")
            assert status == 200
            seen = upstream.requests[-1]["headers"]
            assert "Authorization" not in seen
            assert all(tokens["access_token"] not in value for value in seen.values())


async def test_revoking_the_grants_key_like_any_key_stops_its_tokens_and_its_refresh(
    portal: Portal, alice: Person
) -> None:
    client = await register(portal)
    status, tokens = await client.redeem(await client.code(alice, weather(portal)), weather(portal))
    assert status == 200
    (key,) = await portal.gw.ledger.list_keys("alice@example.com")
    await portal.gw.ops.revoke_key(key.id)  # what `agentpay keys revoke` and the portal's key list do
    assert (await call(weather(portal), tokens["access_token"]))[0] == 401
    status, body = await client.token(grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert (status, body["error"]) == (400, "invalid_grant")
    assert portal.gw.rt.oauth is not None
    assert await portal.gw.rt.oauth.connected("alice@example.com") == []


async def test_a_confidential_client_authenticates_with_http_basic_and_a_wrong_secret_is_refused(
    portal: Portal, alice: Person
) -> None:
    doc = {"client_name": "confidential", "redirect_uris": [REDIRECT_URI]}  # RFC 7591 default: client_secret_basic
    async with aiohttp.ClientSession() as http, http.post(portal.url("/oauth/register"), json=doc) as resp:
        body = await resp.json()
    assert resp.status == 201 and body["token_endpoint_auth_method"] == "client_secret_basic"
    client = RawClient(portal, body["client_id"], REDIRECT_URI)
    code = await client.code(alice, weather(portal))
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": client.verifier,
    }
    async with aiohttp.ClientSession() as http:
        wrong = aiohttp.BasicAuth(client.client_id, "apcs_wrong")
        async with http.post(portal.url("/oauth/token"), data=form, auth=wrong) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "invalid_client"
        async with http.post(portal.url("/oauth/token"), data=form) as resp:  # no secret at all
            assert resp.status == 401
        right = aiohttp.BasicAuth(client.client_id, body["client_secret"])
        async with http.post(portal.url("/oauth/token"), data=form, auth=right) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["Cache-Control"] == "no-store"


async def test_no_code_token_or_client_secret_ever_reaches_the_logs(portal: Portal, alice: Person) -> None:
    with capture_logs() as logs:
        doc = {"client_name": "confidential", "redirect_uris": [REDIRECT_URI]}
        async with aiohttp.ClientSession() as http, http.post(portal.url("/oauth/register"), json=doc) as resp:
            body = await resp.json()
        secret = body["client_secret"]
        client = RawClient(portal, body["client_id"], REDIRECT_URI)
        code = await client.code(alice, weather(portal))
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI}
        async with aiohttp.ClientSession() as http:
            right = aiohttp.BasicAuth(client.client_id, secret)
            async with http.post(
                portal.url("/oauth/token"), data={**form, "code_verifier": client.verifier}, auth=right
            ) as resp:
                tokens = await resp.json()
            async with http.post(portal.url("/oauth/token"), data=form, auth=right) as resp:  # no verifier
                assert resp.status == 400
        access, refresh = tokens["access_token"], tokens["refresh_token"]
        await call(portal.url("/weather/mcp"), access)
        assert (await call(portal.url(f"/k/{access}/weather/mcp"), None))[0] == 401  # a token in the URL
        assert (await call(portal.url("/weather/mcp"), access + "x"))[0] == 401
        async with aiohttp.ClientSession() as http:
            refreshed = {"grant_type": "refresh_token", "refresh_token": refresh}
            for _ in range(2):  # a refresh, then the same refresh token again (refused, the grant revoked)
                async with http.post(portal.url("/oauth/token"), data=refreshed, auth=right) as resp:
                    await resp.read()
    text = json.dumps(logs, default=str)
    assert any(entry.get("event") == "request" for entry in logs)  # the log was captured
    for plain in (secret, code, access, refresh):
        assert plain not in text
