"""The authorization server's decisions on each store (a real SQLite file, a fresh PostgreSQL schema),
with the real ledger and a clock the test moves: codes, refresh rotation, expiry, grants as keys."""

from __future__ import annotations

import base64
import hashlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import OAuthError
from gateway.keys import hash_secret
from gateway.ledger.postgres import PostgresLedger
from gateway.ledger.sqlite import SqliteLedger
from gateway.oauth.consent import Consenter
from gateway.oauth.models import CODE_TTL_S
from gateway.oauth.service import UNUSED_CLIENT_S, AuthorizationRequest, AuthorizeRedirectError, OAuthService
from gateway.oauth.store import open_store
from tests.ledger.conftest import STORES, FakeClock, StoreSpec
from tests.test_config import write

ISSUER = "https://pay.example.com"
WEATHER = "https://pay.example.com/weather/mcp"
REDIRECT = "http://127.0.0.1/callback"
VERIFIER = "v" * 50
CONFIG = """\
listen: "127.0.0.1:8080"
database: "sqlite:///unused.db"
prices: "prices.yaml"
servers:
  weather: {upstream: "http://127.0.0.1:9000/mcp", owner: acme}
  maps: {upstream: "http://127.0.0.1:9001/mcp", owner: acme, hosts: ["maps.example.com"]}
oauth: {enabled: true, access_token_ttl_s: 600, refresh_token_ttl_s: 3600}
"""


def challenge(verifier: str = VERIFIER) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


@dataclass
class Env:
    oauth: OAuthService
    ledger: SqliteLedger | PostgresLedger
    clock: FakeClock
    spec: StoreSpec


@pytest.fixture(params=STORES)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Env]:
    spec = StoreSpec.fresh(request.param, tmp_path)
    clock = FakeClock()
    ledger = spec.open(clock)
    await ledger.open()
    url = f"sqlite:///{spec.location}" if spec.kind == "sqlite" else f"{spec.location}?schema={spec.schema}"
    config = load_config(write(tmp_path, CONFIG), env={})
    oauth = OAuthService(
        store=open_store(url), keys=ledger, config=config, issuer=ISSUER, consent_secret=b"s", clock=clock
    )
    await oauth.open()
    await ledger.create_user("alice")
    try:
        yield Env(oauth, ledger, clock, spec)
    finally:
        await oauth.close()
        await ledger.close()
        await spec.drop()


async def request(env: Env, resource: str = WEATHER, **extra: str) -> tuple[str, AuthorizationRequest]:
    client, _ = await env.oauth.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": "http://127.0.0.1:5555/callback",
        "code_challenge": challenge(),
        "code_challenge_method": "S256",
        "resource": resource,
        "state": "xyz",
        **extra,
    }
    return client.client_id, await env.oauth.check_request(params)


async def code_of(env: Env, req: AuthorizationRequest, spend_limit: int | None = None) -> str:
    location = await env.oauth.approve(req, user="alice", login_id="lgn_1", spend_limit=spend_limit)
    assert "state=xyz" in location and "iss=https%3A%2F%2Fpay.example.com" in location
    return location.split("code=")[1].split("&")[0]


async def redeem(env: Env, client_id: str, code: str, **extra: str) -> dict[str, Any]:
    form = {
        "grant_type": "authorization_code",
        "client_id": client_id,
        "code": code,
        "code_verifier": VERIFIER,
        "redirect_uri": "http://127.0.0.1:5555/callback",
        **extra,
    }
    return await env.oauth.token(form, None)


async def test_a_code_expires_after_its_two_minutes(env: Env) -> None:
    client_id, req = await request(env)
    code = await code_of(env, req)
    env.clock.advance(CODE_TTL_S)
    with pytest.raises(OAuthError) as info:
        await redeem(env, client_id, code)
    assert info.value.error == "invalid_grant"


async def test_a_grant_is_one_key_with_the_spend_limit_and_the_same_consent_reuses_it(env: Env) -> None:
    client_id, req = await request(env)
    tokens = await redeem(env, client_id, await code_of(env, req, spend_limit=500_000))
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 600 and tokens["scope"] == "mcp"
    await redeem(env, client_id, await code_of(env, req, spend_limit=500_000))
    keys = await env.ledger.list_keys("alice")
    assert [(k.server, k.spend_limit, k.revoked_at) for k in keys] == [("weather", 500_000, None)]
    await code_of(env, req, spend_limit=100_000)  # another limit: a new key replaces the old one
    keys = await env.ledger.list_keys("alice")
    assert sorted((k.spend_limit, k.revoked_at is None) for k in keys) == [(100_000, True), (500_000, False)]
    assert [g.spend_limit for g in await env.oauth.connected("alice")] == [100_000]


async def test_an_access_token_resolves_to_its_grant_key_until_it_expires(env: Env) -> None:
    client_id, req = await request(env)
    tokens = await redeem(env, client_id, await code_of(env, req))
    from gateway.keys import hash_secret

    view = await env.oauth.store.find_access_token(hash_secret(tokens["access_token"]))
    assert view is not None and view.server == "weather" and not view.revoked
    assert view.expires_at == env.clock.now + 600
    key = await env.ledger.find_key(view.key_hash)
    assert key is not None and key.user == "alice" and key.prefix.startswith("apoa_")


async def test_a_refresh_token_expires_and_a_refresh_cannot_widen_the_scope(env: Env) -> None:
    client_id, req = await request(env)
    tokens = await redeem(env, client_id, await code_of(env, req))
    form = {"grant_type": "refresh_token", "client_id": client_id, "refresh_token": tokens["refresh_token"]}
    with pytest.raises(OAuthError) as info:
        await env.oauth.token({**form, "scope": "mcp admin"}, None)
    assert info.value.error == "invalid_scope"
    _, req = await request(env)
    tokens = await redeem(env, req.client.client_id, await code_of(env, req))
    env.clock.advance(3600)
    form = {"grant_type": "refresh_token", "client_id": req.client.client_id, "refresh_token": tokens["refresh_token"]}
    with pytest.raises(OAuthError) as info:
        await env.oauth.token(form, None)
    assert info.value.error == "invalid_grant"


async def test_a_host_routed_resource_names_its_server_and_unknown_ones_are_refused(env: Env) -> None:
    assert env.oauth.server_for("https://maps.example.com/mcp") == "maps"
    assert env.oauth.server_for("https://pay.example.com/maps/mcp") == "maps"
    for bad in (
        "https://pay.example.com/nope/mcp",
        "https://pay.example.com/weather/mcp?x=1",
        "ftp://x/weather/mcp",
        "https://evil.example/weather/mcp",  # our server's path on another origin: the token would go there
        "http://pay.example.com/weather/mcp",  # another scheme is another origin
        "https://maps.example.com/weather/mcp",  # a Host-routed name serves its own server only
    ):
        assert env.oauth.server_for(bad) is None


async def test_a_confidential_client_must_authenticate_at_the_token_endpoint(env: Env) -> None:
    client, secret = await env.oauth.register({"redirect_uris": [REDIRECT]})  # RFC 7591 default: client_secret_basic
    assert secret is not None and client.auth_method == "client_secret_basic"
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "code_challenge": challenge(),
        "code_challenge_method": "S256",
        "resource": WEATHER,
        "state": "xyz",
    }
    req = await env.oauth.check_request(params)  # the only redirect URI is used when none is sent
    code = await code_of(env, req)
    form = {"grant_type": "authorization_code", "code": code, "code_verifier": VERIFIER}
    with pytest.raises(OAuthError) as info:
        await env.oauth.token(form, (client.client_id, "wrong"))
    assert (info.value.error, info.value.status) == ("invalid_client", 401)
    tokens = await env.oauth.token(form, (client.client_id, secret))
    assert tokens["access_token"].startswith("apat_")


async def test_consent_tickets_name_who_approved_and_expire(env: Env) -> None:
    params = {"client_id": "apc_x", "resource": WEATHER}
    ticket = env.oauth.tickets.issue(Consenter("wss_1", "lgn_1", "alice"), params, env.clock.now)
    assert env.oauth.tickets.check(ticket, params, env.clock.now) == Consenter("wss_1", "lgn_1", "alice")
    assert env.oauth.tickets.check(ticket, {**params, "scope": "more"}, env.clock.now) is None
    assert env.oauth.tickets.check(ticket, params, env.clock.now + 601) is None
    assert env.oauth.tickets.check(ticket[:-1] + "0", params, env.clock.now) in (
        None,
        Consenter("wss_1", "lgn_1", "alice"),
    )
    assert env.oauth.tickets.check("x." + ticket.split(".")[1], params, env.clock.now) is None


async def test_expired_codes_and_tokens_are_purged(env: Env) -> None:
    client_id, req = await request(env)
    await redeem(env, client_id, await code_of(env, req))
    assert await env.oauth.store.purge(env.clock.now) == 0
    assert await env.oauth.store.purge(env.clock.now + 7200) == 3  # the code, the access and refresh tokens


async def test_a_request_without_scope_or_with_unknown_scopes_gets_the_default_scope(env: Env) -> None:
    _, req = await request(env)  # no scope at all (ChatGPT reconnecting)
    assert req.scope == "mcp"
    _, req = await request(env, scope="openid offline_access")
    assert req.scope == "mcp"


async def test_a_resource_that_is_not_ours_is_refused_with_a_redirect_carrying_invalid_target(env: Env) -> None:
    with pytest.raises(AuthorizeRedirectError) as info:
        await request(env, resource="https://other.example/weather/mcp/extra")
    assert "error=invalid_target" in info.value.location and "state=xyz" in info.value.location


async def test_a_registration_no_grant_uses_is_deleted_a_week_later_and_a_used_one_is_kept(env: Env) -> None:
    used, req = await request(env)
    await redeem(env, used, await code_of(env, req))
    abandoned, _ = await env.oauth.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})
    env.clock.advance(UNUSED_CLIENT_S)
    recent, _ = await env.oauth.register({"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"})

    assert await env.oauth.store.purge_unused_clients(env.clock.now - UNUSED_CLIENT_S + 1) == 1
    assert await env.oauth.client(abandoned.client_id) is None  # it registers again if it comes back
    assert await env.oauth.client(used) is not None and await env.oauth.client(recent.client_id) is not None
    assert await env.oauth.store.purge_unused_clients(env.clock.now - UNUSED_CLIENT_S + 1) == 0


async def everything_stored(spec: StoreSpec) -> str:
    """Every value of every table of the store, as text."""
    if spec.kind == "sqlite":
        with sqlite3.connect(spec.location) as conn:
            return "\n".join(conn.iterdump())
    conn = await spec.pg_connect()
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", spec.schema
        )
        values: list[str] = []
        for table in tables:
            values.extend(str(row[0]) for row in await conn.fetch(f'SELECT t::text FROM "{table[0]}" t'))
        return "\n".join(values)
    finally:
        await conn.close()


async def test_the_database_holds_codes_tokens_and_client_secrets_as_hashes_only(env: Env) -> None:
    client_id, req = await request(env)
    code = await code_of(env, req)
    tokens = await redeem(env, client_id, code)
    _, secret = await env.oauth.register(
        {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "client_secret_post"}
    )
    assert secret is not None
    stored = await everything_stored(env.spec)
    for plain in (code, tokens["access_token"], tokens["refresh_token"], secret):
        assert plain not in stored
        assert hash_secret(plain) in stored  # the scan did read the table that holds it
