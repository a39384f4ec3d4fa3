"""Discovery: the metadata documents, the 401 challenge that points at them, CORS, and API keys
working beside OAuth exactly as before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from gateway.oauth.service import REGISTRATION_BURST
from gateway.proxy.limits import KeyLimits
from tests.harness import mcp_client, new_user
from tests.oauth.flow import call, run_oauth_portal
from tests.portal.harness import Portal
from tests.upstream_sdk import run_upstream


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    async with run_upstream(json_response=True) as upstream:
        servers = {"weather": upstream.url, "maps": upstream.url}
        options = {"maps": {"hosts": ["maps.localhost"]}}
        async with run_oauth_portal(tmp_path, servers, server_options=options) as p:
            yield p


async def get_json(url: str, **headers: str) -> tuple[int, dict[str, str], dict[str, object]]:
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


async def test_authorization_server_metadata_is_served_at_both_discovery_urls(portal: Portal) -> None:
    for path in ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration"):
        status, headers, doc = await get_json(portal.url(path))
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
        assert doc["issuer"] == portal.base
        assert doc["authorization_endpoint"] == portal.url("/oauth/authorize")
        assert doc["token_endpoint"] == portal.url("/oauth/token")
        assert doc["registration_endpoint"] == portal.url("/oauth/register")
        assert doc["revocation_endpoint"] == portal.url("/oauth/revoke")
        assert doc["code_challenge_methods_supported"] == ["S256"]
        assert doc["client_id_metadata_document_supported"] is True
        assert doc["authorization_response_iss_parameter_supported"] is True
        assert "none" in doc["token_endpoint_auth_methods_supported"]  # type: ignore[operator]


async def test_each_server_has_protected_resource_metadata_naming_the_url_the_client_used(portal: Portal) -> None:
    status, headers, doc = await get_json(portal.url("/.well-known/oauth-protected-resource/weather/mcp"))
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert doc["resource"] == portal.url("/weather/mcp")
    assert doc["authorization_servers"] == [portal.base]
    port = portal.base.rsplit(":", 1)[1]
    status, _, doc = await get_json(portal.url("/.well-known/oauth-protected-resource"), Host=f"maps.localhost:{port}")
    assert status == 200 and doc["resource"] == f"http://maps.localhost:{port}/mcp"
    status, _, _ = await get_json(portal.url("/.well-known/oauth-protected-resource"))
    assert status == 404  # the root names no server unless the Host does
    status, _, _ = await get_json(portal.url("/.well-known/oauth-protected-resource/nowhere/mcp"))
    assert status == 404


async def test_a_request_without_credentials_gets_a_challenge_pointing_at_the_metadata(portal: Portal) -> None:
    status, headers, _ = await call(portal.url("/weather/mcp"), None)
    assert status == 401
    prm = portal.url("/.well-known/oauth-protected-resource/weather/mcp")
    assert headers["WWW-Authenticate"] == f'Bearer resource_metadata="{prm}", scope="mcp"'
    status, headers, _ = await call(portal.url("/weather/mcp"), "apat_not-a-token")
    assert status == 401
    assert headers["WWW-Authenticate"] == f'Bearer resource_metadata="{prm}", scope="mcp", error="invalid_token"'


async def test_cors_preflights_are_answered_on_registration_and_token(portal: Portal) -> None:
    for path in ("/oauth/register", "/oauth/token", "/.well-known/oauth-authorization-server"):
        headers = {"Origin": "http://localhost:6274", "Access-Control-Request-Method": "POST"}
        async with aiohttp.ClientSession() as http, http.options(portal.url(path), headers=headers) as resp:
            assert resp.status == 204, path
            assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_api_keys_keep_working_beside_oauth(portal: Portal) -> None:
    key = await new_user(portal.gw.ops, "erin", "100")
    async with mcp_client(portal.url("/weather/mcp"), key) as client:
        result = await client.call_tool("get_forecast", {"city": "Oslo"})
    assert not result.is_error
    status, headers, _ = await call(portal.url("/weather/mcp"), "ap_unknownkeyunknownkey")
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]


async def test_registration_refuses_redirect_uris_that_are_not_safe(portal: Portal) -> None:
    for uris in (["http://evil.example/cb"], ["javascript:alert(1)"], ["https://app.example/cb#frag"], []):
        doc = {"redirect_uris": uris, "token_endpoint_auth_method": "none"}
        async with aiohttp.ClientSession() as http, http.post(portal.url("/oauth/register"), json=doc) as resp:
            assert resp.status == 400, uris
            assert (await resp.json())["error"] in ("invalid_redirect_uri", "invalid_client_metadata")
    doc = {"redirect_uris": ["cursor://anysphere.cursor-mcp/oauth/callback"], "token_endpoint_auth_method": "none"}
    async with aiohttp.ClientSession() as http, http.post(portal.url("/oauth/register"), json=doc) as resp:
        assert resp.status == 201


async def test_registrations_from_one_address_are_rate_limited(portal: Portal) -> None:
    oauth = portal.gw.rt.oauth
    assert oauth is not None
    frozen = KeyLimits(max_concurrent=0, rate_per_s=1.0, burst=REGISTRATION_BURST, clock=lambda: 0.0)
    oauth.registrations = frozen  # time stands still: no token comes back during the test
    doc = {"redirect_uris": ["http://127.0.0.1/cb"], "token_endpoint_auth_method": "none"}
    statuses = []
    async with aiohttp.ClientSession() as http:
        for _ in range(REGISTRATION_BURST + 1):
            async with http.post(portal.url("/oauth/register"), json=doc) as resp:
                statuses.append(resp.status)
                retry_after = resp.headers.get("Retry-After")
    assert statuses == [201] * REGISTRATION_BURST + [429]
    assert retry_after == "1"
