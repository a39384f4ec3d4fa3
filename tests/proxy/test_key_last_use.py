"""A key's last use: noted in memory when a call authenticates (no ledger write per call) and written
by a flush, every ``LAST_USED_FLUSH_S`` seconds and when the gateway drains. The official MCP client
calls through the gateway to the official SDK's server, with a real SQLite ledger."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from gateway.config import load_config
from gateway.errors import InvalidToken, Unavailable
from gateway.keys import hash_secret
from gateway.ledger import open_ledger
from gateway.ledger.sqlite import SqliteLedger
from gateway.oauth.store import open_store
from gateway.proxy.auth import LAST_USED_FLUSH_S, Authenticator
from gateway.proxy.limits import FailureThrottle, TooManyRequests
from tests.harness import Gateway, mcp_client, run_gateway, write_config
from tests.upstream_sdk import run_upstream


async def _last_used(gw: Gateway, user: str = "alice") -> float | None:
    (key,) = await gw.ledger.list_keys(user)
    return key.last_used_at


async def test_a_call_notes_the_keys_last_use_in_memory_and_a_flush_writes_it_once(tmp_path: Path) -> None:
    async with run_upstream() as upstream, run_gateway(write_config(tmp_path, {"weather": upstream.url})) as gw:
        key = await gw.new_user("alice", "100")
        before = time.time()
        async with mcp_client(gw.url(), key) as client:
            for _ in range(3):
                assert not (await client.call_tool("get_forecast", {"city": "Oslo"})).is_error
        after = time.time()
        await gw.settled()
        assert await _last_used(gw) is None  # nothing written per call
        assert gw.rt.auth.unflushed == 1  # one entry for the key, however many calls

        assert await gw.rt.auth.flush_last_used() == 1
        used = await _last_used(gw)
        assert used is not None and before <= used <= after
        assert gw.rt.auth.unflushed == 0
        assert await gw.rt.auth.flush_last_used() == 0  # nothing new: no write
        assert (await gw.ops.list_keys("alice"))[0]["last_used_at"] is not None


async def test_a_refused_key_is_not_noted_as_used(tmp_path: Path) -> None:
    async with run_upstream() as upstream, run_gateway(write_config(tmp_path, {"weather": upstream.url})) as gw:
        key = await gw.new_user("alice", "100")
        await gw.ops.revoke_key((await gw.ops.list_keys("alice"))[0]["id"])
        initialize = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        }
        headers = {"Accept": "application/json, text/event-stream"}
        async with aiohttp.ClientSession() as http:
            for secret in (key, "ap_not_a_key_at_all"):
                async with http.post(
                    gw.url(), json=initialize, headers={**headers, "Authorization": f"Bearer {secret}"}
                ) as r:
                    assert r.status == 401, await r.text()
        assert gw.rt.auth.unflushed == 0
        assert await gw.rt.auth.flush_last_used() == 0
        assert await _last_used(gw) is None


async def test_the_gateway_writes_the_last_uses_it_holds_when_it_drains(tmp_path: Path) -> None:
    async with run_upstream() as upstream:
        config_path = write_config(tmp_path, {"weather": upstream.url})
        async with run_gateway(config_path) as gw:
            key = await gw.new_user("alice", "100")
            async with mcp_client(gw.url(), key) as client:
                assert not (await client.call_tool("get_forecast", {"city": "Oslo"})).is_error
            await gw.settled()
            assert await _last_used(gw) is None  # the 30 s flusher has not run yet
    ledger = open_ledger(load_config(config_path).database)
    await ledger.open()
    try:
        (record,) = await ledger.list_keys("alice")
    finally:
        await ledger.close()
    assert record.last_used_at is not None


async def test_a_flush_that_fails_keeps_the_last_uses_for_the_next_one(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    async with ledger:
        await ledger.create_user("alice")
        key = await ledger.create_key(
            user="alice",
            server="weather",
            key_hash=hash_secret("ap_secret"),
            prefix="ap_secr",
            expires_at=None,
            spend_limit=None,
        )
    wall = [1_700_000_000.0]
    auth = Authenticator(ledger, cache_s=0, wall_clock=lambda: wall[0])
    await ledger.open()
    await auth.authenticate("ap_secret", "weather")
    await ledger.close()
    with pytest.raises(Unavailable):
        await auth.flush_last_used()  # the ledger is closed
    assert auth.unflushed == 1
    async with ledger:
        wall[0] += 5
        await auth.authenticate("ap_secret", "weather")  # a newer use meanwhile
        assert await auth.flush_last_used() == 1
        (record,) = await ledger.list_keys("alice")
    assert record.id == key.id and record.last_used_at == 1_700_000_005.0


async def test_the_background_flusher_writes_every_interval(tmp_path: Path) -> None:
    assert LAST_USED_FLUSH_S == 30.0  # the documented staleness of "last used"
    ledger = SqliteLedger(tmp_path / "ledger.db")
    async with ledger:
        await ledger.create_user("alice")
        await ledger.create_key(
            user="alice",
            server="weather",
            key_hash=hash_secret("ap_secret"),
            prefix="ap_secr",
            expires_at=None,
            spend_limit=None,
        )
        auth = Authenticator(ledger, cache_s=0)
        await auth.authenticate("ap_secret", "weather")
        flusher = asyncio.get_running_loop().create_task(auth.flush_last_used_forever(interval_s=0.01))
        try:
            async with asyncio.timeout(10):
                while True:  # until the flusher has written it, asking the ledger
                    if (await ledger.list_keys("alice"))[0].last_used_at is not None:
                        break
                    await asyncio.sleep(0.01)
        finally:
            flusher.cancel()
        assert auth.unflushed == 0


async def test_the_key_cache_holds_at_most_its_bound_and_never_a_key_that_does_not_exist(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    await ledger.open()
    try:
        await ledger.create_user("alice")
        secrets = []
        for n in range(3):
            secret = f"ap_cache_test_{n:040d}"
            await ledger.create_key(
                user="alice", server="weather", key_hash=hash_secret(secret), prefix=secret[:12],
                expires_at=None, spend_limit=None,
            )  # fmt: skip
            secrets.append(secret)
        auth = Authenticator(ledger, cache_s=60.0, max_cache=2)
        for secret in secrets:
            assert (await auth.authenticate(secret, "weather")).user == "alice"
        assert auth.cached <= 2
        for n in range(50):  # keys nobody holds are looked up, refused and never cached
            assert await auth.lookup(f"ap_unknown_{n:040d}") is None
        assert auth.cached <= 2
    finally:
        await ledger.close()


async def test_unknown_access_tokens_count_against_their_address_like_unknown_keys(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db")
    tokens = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.open()
    await tokens.open()
    try:
        auth = Authenticator(ledger, tokens=tokens, failures=FailureThrottle(burst=2, per_s=1.0, clock=lambda: 0.0))
        for n in range(2):
            with pytest.raises(InvalidToken):
                await auth.authenticate(f"apat_unknown_{n}", "weather", client=lambda: "203.0.113.9")
        with pytest.raises(TooManyRequests):
            await auth.authenticate("apat_unknown_2", "weather", client=lambda: "203.0.113.9")
        with pytest.raises(InvalidToken):  # another address still gets the real answer
            await auth.authenticate("apat_unknown_3", "weather", client=lambda: "198.51.100.1")
    finally:
        await tokens.close()
        await ledger.close()
