"""Bad input gets a clear error, the right status, and nothing is charged."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.money import parse_cents
from gateway.proxy.auth import AUTH_FAILURE_BURST, AUTH_FAILURES_PER_S
from gateway.proxy.limits import FailureThrottle
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, Gateway, rpc, run_gateway, tool_call, write_config

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def send(
    gw: Gateway,
    data: bytes | str,
    *,
    key: str | None = None,
    url: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    hdrs = {**ACCEPT, **(headers or {})}
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as http, http.post(url or gw.url(), data=data, headers=hdrs) as resp:
        raw = await resp.read()
        return resp.status, dict(resp.headers), json.loads(raw) if raw else None


async def test_a_missing_key_is_a_401_with_a_json_rpc_body_saying_how_to_get_one(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        status, headers, body = await send(gw, json.dumps(tool_call("get_forecast")))
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert "resource_metadata" not in headers["WWW-Authenticate"]
        assert body["error"]["data"]["code"] == "missing_key"
        assert "Authorization: Bearer" in body["error"]["message"]


async def test_an_invalid_key_is_a_401_that_never_echoes_the_secret(tmp_path: Path) -> None:
    secret = "ap_thisIsNotARealKeyButLongEnoughToLookLikeOne123"
    async with run_fault_upstream() as (url, _), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        status, _, body = await send(gw, json.dumps(tool_call("get_forecast")), key=secret)
        assert status == 401
        assert body["error"]["data"]["code"] == "invalid_key"
        assert secret not in json.dumps(body)


async def test_a_key_for_another_server_is_refused_with_403(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url, "maps": url}, FAULT_PRICES)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100", server="maps")
            status, _, body = await send(gw, json.dumps(tool_call("get_forecast")), key=key)
            assert status == 403
            assert body["error"]["data"]["code"] == "wrong_server"
            assert "'maps'" in body["error"]["message"]
            assert upstream.completed == []


async def test_malformed_json_is_a_400_parse_error(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        key = await gw.new_user("alice", "100")
        status, _, body = await send(gw, b'{"jsonrpc": "2.0", "method": ', key=key)
        assert status == 400
        assert body["error"]["code"] == -32700


async def test_an_oversized_body_is_a_413_and_never_reaches_the_upstream(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, max_body_bytes=1024)) as gw:
            key = await gw.new_user("alice", "100")
            big = json.dumps(tool_call("echo", {"message": "x" * 5000}))
            status, _, body = await send(gw, big, key=key)
            assert status == 413
            assert body["error"]["data"]["code"] == "body_too_large"
            assert upstream.requests == []


async def test_an_unknown_server_is_a_404_that_names_it(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        key = await gw.new_user("alice", "100")
        status, _, body = await send(gw, json.dumps(tool_call("x")), key=key, url=gw.url("nope"))
        assert status == 404
        assert "'nope'" in body["error"]["message"]


async def test_a_priced_notification_is_refused_as_an_invalid_request(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100")
            status, _, body = await send(gw, json.dumps(rpc("tools/call", {"name": "get_forecast"}, rid=None)), key=key)
            assert status == 400
            assert body["error"]["code"] == -32600
            assert upstream.completed == []


async def test_insufficient_balance_on_a_tool_is_an_is_error_result_with_price_and_balance(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, topup_url="https://pay.example.com/topup")
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "3")
            status, _, body = await send(gw, json.dumps(tool_call("get_forecast")), key=key)
            assert status == 200
            result = body["result"]
            assert result["isError"] is True
            text = result["content"][0]["text"]
            assert "5¢" in text and "3¢" in text and "https://pay.example.com/topup" in text
            assert result["_meta"]["io.agentpay/payment_required"]["price_cents"] == "5"
            assert upstream.completed == []


async def test_insufficient_balance_on_a_resource_is_a_32402_error_with_details(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "0.5")
            status, _, body = await send(gw, json.dumps(rpc("resources/read", {"uri": "demo://alerts/north"})), key=key)
            assert status == 200
            assert body["error"]["code"] == -32402
            assert body["error"]["data"]["price_cents"] == "1"
            assert body["error"]["data"]["available_cents"] == "0.5"
            assert "topup_url" in body["error"]["data"]


async def test_the_spend_limit_of_a_key_is_enforced_by_the_hold(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _):
        async with run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw:
            key = await gw.new_user("alice", "100", spend_limit_cents="12")
            outcomes = []
            for _ in range(4):
                _, _, body = await send(gw, json.dumps(tool_call("get_forecast")), key=key)
                outcomes.append(body["result"].get("isError", False))
            assert outcomes == [False, False, True, True]
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("90")


async def test_a_key_revoked_by_the_cli_in_another_process_stops_working_within_a_second(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, _):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            status, _, _ = await send(gw, json.dumps(tool_call("echo")), key=key)
            assert status == 200
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "--config",
                str(config),
                "keys",
                "revoke",
                key[:11],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            revoked_at = time.monotonic()
            while True:
                status, _, body = await send(gw, json.dumps(tool_call("echo")), key=key)
                if status == 401:
                    break
                assert time.monotonic() - revoked_at < 1.5, "revocation did not take effect within 1 s"
                await asyncio.sleep(0.05)
            assert body["error"]["data"]["code"] == "revoked_key"


async def test_a_broken_price_edit_keeps_the_last_good_table_and_a_good_one_applies_to_the_next_call(
    tmp_path: Path,
) -> None:
    async with run_fault_upstream() as (url, _):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            prices = tmp_path / "prices.yaml"
            prices.write_text("weather:\n  tools:\n    get_forecast: 0.0001\n")
            assert gw.rt.prices.check_once() is False
            assert gw.rt.prices.last_error is not None and gw.rt.prices.last_error.line == 3
            await send(gw, json.dumps(tool_call("get_forecast")), key=key)
            await gw.settled()
            assert await gw.balance("alice") == parse_cents("95")

            prices.write_text(yaml.safe_dump({"weather": {"tools": {"get_forecast": "7.5"}}}))
            assert gw.rt.prices.check_once() is True
            await send(gw, json.dumps(tool_call("get_forecast")), key=key)
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("87.5")


async def test_the_callers_key_is_never_forwarded_upstream(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        key = await gw.new_user("alice", "100")
        await send(gw, json.dumps(tool_call("echo", {"message": "x"})), key=key)
        await send(gw, json.dumps(tool_call("echo", {"message": "x"})), headers={"X-API-Key": key})
        assert len(upstream.requests) == 2
        for seen in upstream.requests:
            assert key not in json.dumps(seen)
            assert "X-Forwarded-For" in seen["headers"]


async def test_a_foreign_origin_is_refused_with_403(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        key = await gw.new_user("alice", "100")
        status, _, body = await send(
            gw, json.dumps(tool_call("echo")), key=key, headers={"Origin": "https://evil.example"}
        )
        assert status == 403
        assert body["error"]["data"]["code"] == "origin_forbidden"
        assert upstream.requests == []


async def test_an_address_sending_unknown_keys_is_refused_without_a_database_look_up_after_thirty(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Every unknown key used to cost a database look-up, with no limit before authentication."""
    async with run_fault_upstream() as (url, _):
        # key_cache_s=0: every call looks its key up again, so alice's key is stale at once
        config = write_config(tmp_path, {"weather": url}, trusted_proxies=["127.0.0.1"], key_cache_s=0)
        async with run_gateway(config) as gw:
            good = await gw.new_user("alice", "100")
            body = json.dumps(rpc("tools/list"))
            mallory = {"X-Forwarded-For": "203.0.113.7"}
            assert (await send(gw, body, key=good, headers=mallory))[0] == 200  # alice's key is now cached
            looked_up: list[str] = []
            real = gw.ledger.find_key

            async def counting(key_hash: str) -> Any:
                looked_up.append(key_hash)
                return await real(key_hash)

            monkeypatch.setattr(gw.ledger, "find_key", counting)
            # the allowance as configured, on a clock that stands still: no refill, however slow the machine
            frozen = FailureThrottle(burst=AUTH_FAILURE_BURST, per_s=AUTH_FAILURES_PER_S, clock=lambda: 0.0)
            monkeypatch.setattr(gw.rt.auth, "failures", frozen)
            for n in range(AUTH_FAILURE_BURST):
                status, _, answer = await send(gw, body, key=f"ap_{n:043d}", headers=mallory)
                assert status == 401 and answer["error"]["data"]["code"] == "invalid_key"
            assert len(looked_up) == AUTH_FAILURE_BURST == 30

            status, headers, answer = await send(gw, body, key="ap_" + "9" * 43, headers=mallory)
            assert status == 429 and answer["error"]["data"]["code"] == "rate_limited"
            assert int(headers["Retry-After"]) >= 1 and "unknown keys" in answer["error"]["message"]
            assert len(looked_up) == 30  # refused before the database

            # a key seen valid before is never refused for its address, though its cache entry is stale:
            # an attacker behind alice's NAT (or an untrusted proxy) cannot lock her out
            assert (await send(gw, body, key=good, headers=mallory))[0] == 200
            assert len(looked_up) == 31  # looked up again (stale), not refused
            other = {"X-Forwarded-For": "198.51.100.2"}
            assert (await send(gw, body, key="ap_" + "8" * 43, headers=other))[0] == 401  # another address is not
