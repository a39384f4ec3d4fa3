"""Per-key concurrency and rate limits, slow clients and oversized headers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from gateway.money import parse_cents
from gateway.proxy.limits import FailureThrottle, KeyLimits, TooManyRequests
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, run_gateway, tool_call, write_config
from tests.upstream_sdk import run_upstream

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limit_allows_a_burst_then_refills_at_the_configured_rate() -> None:
    clock = Clock()
    limits = KeyLimits(max_concurrent=0, rate_per_s=2, burst=3, clock=clock)
    for _ in range(3):
        limits.acquire("k")
        limits.release("k")
    with pytest.raises(TooManyRequests) as refused:
        limits.acquire("k")
    assert refused.value.retry_after_s == 1
    clock.now += 0.5  # one token back at 2 per second
    limits.acquire("k")
    limits.acquire("other")  # keys are independent


def test_the_concurrency_limit_counts_calls_in_flight_per_key() -> None:
    limits = KeyLimits(max_concurrent=2, rate_per_s=0, burst=1)
    limits.acquire("k")
    limits.acquire("k")
    with pytest.raises(TooManyRequests):
        limits.acquire("k")
    limits.release("k")
    limits.acquire("k")
    assert limits.inflight("k") == 2


async def test_a_key_over_its_concurrency_limit_gets_429_with_retry_after_and_is_not_charged(tmp_path: Path) -> None:
    async with run_upstream(json_response=True, stateless=True) as up:
        config = write_config(tmp_path, {"weather": up.url}, max_concurrent_per_key=1)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            auth = {**HEADERS, "Authorization": f"Bearer {key}"}
            async with aiohttp.ClientSession() as http:
                first = asyncio.create_task(http.post(gw.url(), json=tool_call("wait_for_release"), headers=auth))
                async with asyncio.timeout(10):
                    await up.log.started.wait()
                async with http.post(gw.url(), json=tool_call("get_forecast", {"city": "x"}), headers=auth) as resp:
                    assert resp.status == 429
                    assert resp.headers["Retry-After"] == "1"
                    body = await resp.json()
                    assert body["error"]["data"]["code"] == "rate_limited"
                up.log.release.set()
                async with await first as resp:
                    assert resp.status == 200
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("95")
            assert up.log.completed == ["wait_for_release"]


async def test_a_key_over_its_rate_gets_429(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, rate_per_key=0.5, rate_burst=2)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            statuses = []
            async with aiohttp.ClientSession() as http:
                for _ in range(3):
                    async with http.post(
                        gw.url(),
                        json=tool_call("echo", {"message": "x"}),
                        headers={**HEADERS, "Authorization": f"Bearer {key}"},
                    ) as resp:
                        statuses.append((resp.status, resp.headers.get("Retry-After")))
            assert statuses == [(200, None), (200, None), (429, "2")]
            assert len(upstream.requests) == 2


async def test_a_client_that_sends_its_body_too_slowly_gets_408(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, client_body_timeout_s=0.2)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.server.port)
            head = (
                f"POST /weather/mcp HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{"
            )
            writer.write(head.encode())
            await writer.drain()
            async with asyncio.timeout(10):
                status_line = await reader.readline()
            writer.close()
            assert b" 408 " in status_line
            assert upstream.requests == []


async def test_an_oversized_header_is_refused_before_reaching_the_upstream(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream), run_gateway(write_config(tmp_path, {"weather": url})) as gw:
        key = await gw.new_user("alice", "100")
        async with aiohttp.ClientSession() as http:
            headers = {**HEADERS, "Authorization": f"Bearer {key}", "X-Filler": "a" * 20000}
            async with http.post(gw.url(), data=json.dumps(tool_call("echo")), headers=headers) as resp:
                assert resp.status in (400, 431)
        assert upstream.requests == []


def test_the_limits_keep_state_for_a_bounded_number_of_keys_however_many_come_and_go() -> None:
    """The rate buckets are also keyed by client address (OAuth registrations): unbounded input."""
    limits = KeyLimits(max_concurrent=5, rate_per_s=1.0, burst=2, clock=Clock())
    for n in range(200_001):
        limits.acquire(f"k{n}")
        limits.release(f"k{n}")
    assert limits.tracked <= 200_000  # buckets only: every released key's concurrency entry is gone
    limits.acquire("busy")
    assert limits.inflight("busy") == 1
    limits.release("busy")
    assert limits.inflight("busy") == 0


def test_failed_look_ups_are_allowed_in_a_burst_then_one_a_second_and_a_refilled_address_is_forgotten() -> None:
    clock = Clock()
    throttle = FailureThrottle(burst=3, per_s=1.0, clock=clock)
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") is None
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 1  # asking does not count
    assert throttle.retry_after("10.0.0.2") is None  # addresses are independent
    clock.now += 1.0
    assert throttle.retry_after("10.0.0.1") is None
    throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 1
    clock.now += 10.0
    assert throttle.retry_after("10.0.0.1") is None and throttle.tracked == 0  # full again: not kept


def test_the_failure_throttle_keeps_a_bounded_number_of_addresses() -> None:
    throttle = FailureThrottle(burst=3, per_s=1.0, clock=Clock(), max_tracked=1_000)
    for n in range(5_000):
        throttle.failed(f"addr-{n}")
    assert throttle.tracked <= 1_000
