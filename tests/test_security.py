"""Threats from THREAT_MODEL.md that had a mitigation but no test: each one through a real gateway,
a real upstream and real HTTP clients, with the ledger checked afterwards."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from gateway.config import load_config
from gateway.keys import API_KEY_PREFIX, display_prefix, generate_secret, hash_secret
from gateway.ledger.base import AccountKind
from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, Gateway, rpc, run_gateway, tool_call, write_config
from tests.upstream_sdk import run_upstream

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PATIENCE = 10.0


async def post(url: str, body: Any, headers: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers={**ACCEPT, **headers}) as resp:
        raw = await resp.read()
        parsed = json.loads(raw) if resp.content_type == "application/json" and raw else raw.decode()
        return resp.status, dict(resp.headers), parsed


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- S: an expired key ----------------------------------------------------------------------------
async def expired_key(gw: Gateway, user: str, cents: str) -> str:
    """A key whose expiry has passed (the CLI refuses to create one, so it is written to the ledger)."""
    await gw.ops.create_user(user, cents)
    secret = generate_secret(API_KEY_PREFIX)
    await gw.ledger.create_key(
        user=user,
        server="weather",
        key_hash=hash_secret(secret),
        prefix=display_prefix(secret),
        expires_at=time.time() - 1,
        spend_limit=None,
    )
    return secret


async def test_an_expired_key_is_refused_at_the_proxy_with_401_and_charges_nothing(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await expired_key(gw, "alice", "100")
            priced = tool_call("get_forecast", {"city": "Oslo"})
            answers = [
                await post(gw.url(), priced, bearer(key)),
                await post(gw.url(), priced, {"X-API-Key": key}),
                await post(gw.url(path_key=key), priced, {}),
            ]
            async with aiohttp.ClientSession() as http:
                for method in ("GET", "DELETE"):
                    async with http.request(method, gw.url(), headers={**ACCEPT, **bearer(key)}) as resp:
                        answers.append((resp.status, dict(resp.headers), await resp.json()))
            for status, headers, body in answers:
                assert status == 401
                assert headers["WWW-Authenticate"] == 'Bearer realm="agentpay", error="invalid_token"'
                assert body["error"]["data"]["code"] == "expired_key"
                assert "has expired" in body["error"]["message"]
                assert key not in json.dumps(body)
            assert upstream.requests == []
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")


# --- S: another key's legacy HTTP+SSE channel ------------------------------------------------------
class SseStream:
    """A legacy GET /sse stream read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next_event(self) -> tuple[str, str]:
        name, data = "message", []
        async with asyncio.timeout(PATIENCE):
            while True:
                line = (await self.response.content.readline()).decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data.append(line.removeprefix("data:").strip())
                elif not line and data:
                    return name, "\n".join(data)

    async def next_message(self) -> dict[str, Any]:
        name, data = await self.next_event()
        while name != "message":
            name, data = await self.next_event()
        message: dict[str, Any] = json.loads(data)
        return message


@asynccontextmanager
async def legacy_stream(http: aiohttp.ClientSession, url: str, key: str) -> AsyncIterator[tuple[SseStream, str]]:
    """Open GET /<server>/sse with ``key``; yield the stream and its POST endpoint (an absolute URL)."""
    async with http.get(url, headers={"Accept": "text/event-stream", **bearer(key)}) as resp:
        assert resp.status == 200
        stream = SseStream(resp)
        name, endpoint = await stream.next_event()
        assert name == "endpoint" and "/messages?channel=" in endpoint
        yield stream, str(resp.url.join(URL(endpoint)))


async def test_a_legacy_sse_channel_accepts_posts_only_from_the_key_that_opened_it(tmp_path: Path) -> None:
    async with run_upstream(legacy_sse=True) as up:
        async with run_gateway(write_config(tmp_path, {"weather": up.url, "maps": up.url})) as gw:
            alice = await gw.new_user("alice", "100")
            mallory = await gw.new_user("mallory", "100")
            maps_key = await gw.new_user("bob", "100", server="maps")
            sse_url = gw.url().removesuffix("/mcp") + "/sse"
            priced = tool_call("get_forecast", {"city": "Oslo"}, rid=2)
            async with aiohttp.ClientSession() as http, legacy_stream(http, sse_url, alice) as (stream, endpoint):
                status, _, body = await post(endpoint, priced, bearer(mallory))
                assert status == 404 and body["error"]["data"]["code"] == "session_not_found"
                status, _, body = await post(endpoint, priced, bearer(maps_key))
                assert status == 403 and body["error"]["data"]["code"] == "wrong_server"
                maps_endpoint = endpoint.replace("/weather/messages", "/maps/messages")
                status, _, body = await post(maps_endpoint, priced, bearer(maps_key))
                assert status == 404 and body["error"]["data"]["code"] == "session_not_found"
                # The channel itself works for its owner: the handshake, then one paid call.
                init = rpc(
                    "initialize",
                    {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
                )
                assert (await post(endpoint, init, bearer(alice)))[0] == 202
                assert "result" in await stream.next_message()
                assert (await post(endpoint, rpc("notifications/initialized", rid=None), bearer(alice)))[0] == 202
                assert (await post(endpoint, priced, bearer(alice)))[0] == 202
                answer = await stream.next_message()
                assert answer["id"] == 2 and answer["result"]["content"][0]["text"] == "Sunny in Oslo"
            await gw.verify_clean()
            assert up.log.completed == ["get_forecast"]
            assert await gw.balance("alice") == parse_cents("95")
            assert await gw.balance("mallory") == parse_cents("100")
            assert await gw.balance("bob") == parse_cents("100")


# --- E: a service token charging outside its servers ------------------------------------------------
async def service_call(gw: Gateway, path: str, token: str, body: dict[str, Any], idem: str) -> tuple[int, Any]:
    headers = {**bearer(token), "Idempotency-Key": idem}
    async with (
        aiohttp.ClientSession() as http,
        http.post(gw.server.make_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_a_service_token_cannot_charge_or_hold_for_a_server_outside_its_list(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, {"tools": None, "extra": None, "maps": None}, {}, server_options={"maps": {"owner": "rival"}}
    )
    async with run_gateway(config) as gw:
        tools_key = await gw.new_user("alice", "100", server="tools")
        extra_key = await gw.new_user("bob", "100", server="extra")
        maps_key = await gw.new_user("carol", "100", server="maps")
        token = str((await gw.ops.create_token(developer="acme", servers=["tools"]))["token"])
        attempts: list[tuple[dict[str, Any], int, str]] = [
            ({"key": maps_key, "server": "maps"}, 400, "invalid_input"),  # another developer's server
            ({"key": extra_key, "server": "extra"}, 400, "invalid_input"),  # the developer's own, not on the token
            ({"key": maps_key}, 422, "wrong_server"),  # the token's server, another server's key
            ({"key": extra_key}, 422, "wrong_server"),
            ({"key": tools_key, "server": ["tools"]}, 400, "invalid_input"),
        ]
        for n, (fields, want_status, want_code) in enumerate(attempts):
            for path in ("/v1/charges", "/v1/holds"):
                body = {**fields, "amount_cents": "5", "feature": "f"}
                status, answer = await service_call(gw, path, token, body, f"attempt-{n}-{path}")
                assert (status, answer["error"]["code"]) == (want_status, want_code), (fields, path, answer)
                assert maps_key not in json.dumps(answer) and extra_key not in json.dumps(answer)
        status, _ = await service_call(
            gw, "/v1/charges", token, {"key": tools_key, "amount_cents": "5", "feature": "f"}, "allowed"
        )
        assert status == 201  # the token does work for its own server
        await gw.verify_clean()
        assert [await gw.balance(u) for u in ("alice", "bob", "carol")] == [
            parse_cents(c) for c in ("95", "100", "100")
        ]
        assert [await gw.held(u) for u in ("alice", "bob", "carol")] == [0, 0, 0]
        assert (await gw.ledger.get_account(AccountKind.DEVELOPER, "rival")).balance == 0


# --- D: max_batch_items end to end ------------------------------------------------------------------
async def test_a_batch_over_max_batch_items_is_refused_whole_before_any_hold_or_upstream_call(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES, max_batch_items=3)) as gw:
            key = await gw.new_user("alice", "100")
            batch = [tool_call("get_forecast", {"city": str(i)}, rid=i) for i in range(4)]
            status, _, body = await post(gw.url(), batch, bearer(key))
            assert status == 400
            assert body["error"]["code"] == -32600 and body["error"]["data"]["code"] == "bad_request"
            assert "at most 3" in body["error"]["message"] and "Split the batch" in body["error"]["message"]
            assert upstream.requests == []
            assert await gw.held("alice") == 0 and await gw.balance("alice") == parse_cents("100")
            status, _, body = await post(gw.url(), batch[:3], bearer(key))
            assert status == 200 and sorted(item["id"] for item in body) == [0, 1, 2]
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("85")
            assert upstream.completed.count("get_forecast") == 3


# --- T: duplicate members end to end ----------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_forecast","name":"echo"}}',
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","\\u006eame":"get_forecast"}}',
    ],
    ids=["plain", "escaped"],
)
async def test_a_call_naming_its_tool_twice_is_refused_and_never_reaches_the_upstream(
    tmp_path: Path, body: bytes
) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            status, _, answer = await post(gw.url(), body, bearer(key))
            assert status == 400
            assert answer["error"]["code"] == -32600
            assert 'member "name" twice' in answer["error"]["message"]
            assert upstream.requests == []
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("100")


# --- I: secrets of the configuration out of repr() ----------------------------------------------------
async def test_the_admin_token_and_session_secret_never_appear_in_a_repr_of_the_config_or_runtime(
    tmp_path: Path,
) -> None:
    admin_token, session_secret, upstream_secret = (secrets.token_hex(16) for _ in range(3))
    async with run_fault_upstream() as (url, _):
        path = write_config(
            tmp_path,
            {"weather": url},
            FAULT_PRICES,
            admin_token=admin_token,
            session_secret=session_secret,
            server_options={"weather": {"upstream_headers": {"X-Upstream-Secret": upstream_secret}}},
        )
        config = load_config(path)
        assert (config.admin_token, config.session_secret) == (admin_token, session_secret)
        async with run_gateway(path) as gw:
            texts = [repr(config), str(config), repr(config.servers), repr(gw.rt), repr(gw.rt.config)]
    for text in texts:
        for secret in (admin_token, session_secret, upstream_secret):
            assert secret not in text
