"""Each API key gets a fair share of a server's upstream connections (``max_key_share``): a key at its
share waits its turn in its own queue, bounded by ``upstream_queue_timeout_s``, and others go by."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

import gateway.config as gwconfig
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.money import parse_cents
from gateway.proxy import UPSTREAMS
from gateway.proxy.fair_share import FairShare, share_limit
from gateway.proxy.limits import TooManyRequests
from gateway.proxy.upstream_client import UpstreamClient
from tests.harness import run_gateway, tool_call, write_config

REPO = Path(__file__).resolve().parents[2]
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
PRICES: dict[str, Any] = {"weather": {"tools": {"slow": "5", "paid": "5"}, "default": 0}}


# --- a slow real upstream ------------------------------------------------------------------------
class SlowUpstream:
    """A JSON-RPC upstream: a ``tools/call`` of ``slow`` waits for ``release``; anything else answers
    at once. It counts the slow calls it is holding (``in_flight``, ``peak``)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[str] = []
        self.in_flight = 0
        self.peak = 0
        self._watchers: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("params", {}).get("name", "")
        self.calls.append(name)
        if name == "slow":
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self._changed()
            try:
                await self.release.wait()
            finally:
                self.in_flight -= 1
                self._changed()
        result = {"content": [{"type": "text", "text": name}], "isError": False}
        return web.json_response({"jsonrpc": "2.0", "id": body.get("id"), "result": result})

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait (at most 10 s) until ``condition()`` holds; woken by the upstream's own changes."""
        if condition():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._watchers.append((condition, waiter))
        async with asyncio.timeout(10):
            await waiter

    def _changed(self) -> None:
        for condition, waiter in list(self._watchers):
            if not waiter.done() and condition():
                waiter.set_result(None)
                self._watchers.remove((condition, waiter))


@asynccontextmanager
async def slow_upstream() -> AsyncIterator[tuple[str, SlowUpstream]]:
    upstream = SlowUpstream()
    app = web.Application()
    app.router.add_post("/mcp", upstream.handle)
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("/mcp")), upstream
    finally:
        upstream.release.set()  # nothing stays blocked, even when a test failed
        await server.close()


def auth(key: str) -> dict[str, str]:
    return {**HEADERS, "Authorization": f"Bearer {key}"}


# --- end to end ----------------------------------------------------------------------------------
async def test_one_key_firing_many_slow_calls_holds_at_most_its_share_and_another_users_call_goes_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with slow_upstream() as (url, upstream):
        config = write_config(tmp_path, {"weather": url}, PRICES, server_options={"weather": {"max_connections": 4}})
        async with run_gateway(config) as gw:
            hog = await gw.new_user("hog", "100")
            other = await gw.new_user("other", "100")
            # Probe: know when all of the hog's calls have reached the server's upstream client.
            client = gw.server.app[UPSTREAMS]["weather"]
            real_request = client.request
            arrived = 0
            all_arrived = asyncio.Event()

            async def counting_request(*args: Any, **kwargs: Any) -> Any:
                nonlocal arrived
                arrived += 1
                if arrived == 10:
                    all_arrived.set()
                return await real_request(*args, **kwargs)

            monkeypatch.setattr(client, "request", counting_request)
            async with aiohttp.ClientSession() as http:

                async def call(key: str, name: str, rid: int) -> tuple[int, dict[str, Any]]:
                    async with http.post(gw.url(), json=tool_call(name, rid=rid), headers=auth(key)) as resp:
                        return resp.status, await resp.json()

                hogs = [asyncio.create_task(call(hog, "slow", i)) for i in range(10)]
                try:
                    async with asyncio.timeout(10):
                        await all_arrived.wait()
                    await upstream.until(lambda: upstream.in_flight >= 2)
                    monkeypatch.undo()

                    async with asyncio.timeout(5):  # before the fix: stuck behind the hog in the pool's queue
                        status, body = await call(other, "quick", 99)
                    assert (status, body["result"]["content"][0]["text"]) == (200, "quick")
                    # ... answered while every one of the hog's calls is still unanswered
                    assert upstream.in_flight == 2 and not upstream.release.is_set()
                    assert not any(task.done() for task in hogs)
                finally:
                    upstream.release.set()
                    results = await asyncio.gather(*hogs, return_exceptions=True)
            assert [result[0] for result in results if isinstance(result, tuple)] == [200] * 10
            assert upstream.peak == 2  # ceil(0.5 * 4): the hog never held more than its share
            assert upstream.calls.count("slow") == 10
            await gw.verify_clean()
            assert await gw.balance("hog") == parse_cents("50")  # each of its calls charged once


async def test_a_key_over_its_share_past_the_queue_timeout_gets_429_with_retry_after_and_is_not_charged(
    tmp_path: Path,
) -> None:
    async with slow_upstream() as (url, upstream):
        options = {"weather": {"max_connections": 2, "upstream_queue_timeout_s": 0.2}}  # share: 1 call
        config = write_config(tmp_path, {"weather": url}, PRICES, server_options=options)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            async with aiohttp.ClientSession() as http:
                first = asyncio.create_task(http.post(gw.url(), json=tool_call("slow"), headers=auth(key)))
                await upstream.until(lambda: upstream.in_flight == 1)
                async with http.post(gw.url(), json=tool_call("paid", rid=2), headers=auth(key)) as resp:
                    assert resp.status == 429
                    assert resp.headers["Retry-After"] == "1"
                    error = (await resp.json())["error"]
                assert error["data"]["code"] == "rate_limited"
                assert error["data"]["in_flight"] == 1
                assert "already has 1 call in flight to this server" in error["message"]
                assert "Wait for this key's calls to this server to finish" in error["message"]
                await gw.settled_except(held=1)
                assert await gw.held("alice") == parse_cents("5")  # only the first call is held
                assert upstream.calls == ["slow"]  # the refused call never reached the upstream

                upstream.release.set()
                async with await first as resp:
                    assert resp.status == 200
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("95")  # charged for the first call only


# --- the upstream client: a share lasts as long as its answer ------------------------------------
@asynccontextmanager
async def raw_upstream(answer: bytes) -> AsyncIterator[str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.split(b"\r\nContent-Length: ")[1].split(b"\r\n")[0]))
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}/mcp"
    finally:
        listener.close()


async def test_a_keys_share_is_held_until_its_streamed_answer_is_released_and_then_forgotten() -> None:
    unfinished = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 100\r\n\r\ndata: 1\n\n"
    async with raw_upstream(unfinished) as url:
        client = UpstreamClient(connect_timeout_s=5, max_connections=2)
        stream = await client.request("POST", url, data=b"{}", headers=CIMultiDict(), key="k", queue_timeout_s=0)
        assert await stream.content.readany() == b"data: 1\n\n"  # a stream still open
        with pytest.raises(TooManyRequests) as refused:
            await client.request("POST", url, data=b"{}", headers=CIMultiDict(), key="k", queue_timeout_s=0)
        assert refused.value.retry_after_s == 1
        other = await client.request("POST", url, data=b"{}", headers=CIMultiDict(), key="other", queue_timeout_s=0)
        other.release()
        stream.release()
        again = await client.request("POST", url, data=b"{}", headers=CIMultiDict(), key="k", queue_timeout_s=0)
        again.release()
        assert len(client._share) == 0  # nothing in flight: no key is remembered
        await client.close()


# --- the share limiter ---------------------------------------------------------------------------
async def queued(share: FairShare, key: str, count: int) -> None:
    """Let the loop run the waiters' tasks until ``count`` of them stand in the key's queue."""
    for _ in range(100):
        if share.waiting(key) == count:
            return
        await asyncio.sleep(0)  # one turn of the event loop, not a timed wait
    raise AssertionError(f"{share.waiting(key)} waiting, expected {count}")


def test_the_share_is_the_fraction_of_max_connections_rounded_up_and_at_least_one() -> None:
    assert share_limit(0.5, 4) == 2
    assert share_limit(0.5, 5) == 3
    assert share_limit(0.07, 100) == 7  # not 8 through 7.000000000000001
    assert share_limit(0.01, 10) == 1
    assert share_limit(1, 100) == 100


async def test_waiters_get_their_turn_in_arrival_order_and_each_release_wakes_the_next() -> None:
    share = FairShare()
    await share.acquire("k", 1, 10)
    order: list[int] = []

    async def wait_then_note(i: int) -> None:
        await share.acquire("k", 1, 10)
        order.append(i)

    tasks = []
    for i in range(3):
        tasks.append(asyncio.create_task(wait_then_note(i)))
        await queued(share, "k", i + 1)
    assert not share.try_acquire("k", 1)  # a newcomer does not overtake the queue
    for expected in ([0], [0, 1], [0, 1, 2]):
        share.release("k")
        await tasks[len(expected) - 1]
        assert order == expected
        assert share.in_flight("k") == 1
    share.release("k")
    assert len(share) == 0


async def test_other_keys_are_not_held_up_by_a_key_at_its_share() -> None:
    share = FairShare()
    await share.acquire("hog", 1, 10)
    waiting = asyncio.create_task(share.acquire("hog", 1, 10))
    await queued(share, "hog", 1)
    await share.acquire("other", 1, 10)  # at once
    assert (share.in_flight("hog"), share.waiting("hog"), share.in_flight("other")) == (1, 1, 1)
    share.release("hog")
    await waiting
    share.release("hog")
    share.release("other")
    assert len(share) == 0


async def test_a_cancelled_waiter_leaves_the_queue_without_leaking_a_slot() -> None:
    share = FairShare()
    await share.acquire("k", 1, 10)
    waiter = asyncio.create_task(share.acquire("k", 1, 10))
    await queued(share, "k", 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert (share.in_flight("k"), share.waiting("k")) == (1, 0)
    share.release("k")
    assert len(share) == 0  # the key is forgotten: nothing in flight, nobody waiting
    assert share.try_acquire("k", 1)  # and its slot is free again


async def test_a_waiter_cancelled_just_as_it_is_given_the_slot_passes_it_on() -> None:
    share = FairShare()
    await share.acquire("k", 1, 10)
    first = asyncio.create_task(share.acquire("k", 1, 10))
    await queued(share, "k", 1)
    second = asyncio.create_task(share.acquire("k", 1, 10))
    await queued(share, "k", 2)
    share.release("k")  # the slot goes to ``first`` ...
    first.cancel()  # ... which is cancelled before it could run
    with pytest.raises(asyncio.CancelledError):
        await first
    await second  # the slot went on to the next in line
    assert (share.in_flight("k"), share.waiting("k")) == (1, 0)
    share.release("k")
    assert len(share) == 0


async def test_a_wait_past_the_timeout_is_refused_and_leaves_nothing_behind() -> None:
    share = FairShare()
    await share.acquire("k", 1, 10)
    with pytest.raises(TooManyRequests) as refused:
        await share.acquire("k", 1, 0.01, total=2)
    assert refused.value.http_status == 429
    assert refused.value.retry_after_s == 1
    assert "already has 1 call in flight to this server, its fair share (1) of the server's 2" in str(refused.value)
    with pytest.raises(TooManyRequests):
        await share.acquire("k", 1, 0)  # 0: refused at once, without waiting
    assert (share.in_flight("k"), share.waiting("k")) == (1, 0)
    share.release("k")
    assert len(share) == 0


async def test_closing_fails_the_waiters() -> None:
    share = FairShare()
    await share.acquire("k", 1, 10)
    waiter = asyncio.create_task(share.acquire("k", 1, 10))
    await queued(share, "k", 1)
    share.close(aiohttp.ClientConnectionError("closed"))
    with pytest.raises(aiohttp.ClientConnectionError):
        await waiter
    assert share.waiting("k") == 0


# --- configuration -------------------------------------------------------------------------------
MINIMAL = """\
listen: "127.0.0.1:8080"
database: "sqlite:///agentpay.db"
prices: "prices.yaml"
servers:
  weather:
    upstream: "http://127.0.0.1:9000/mcp"
    owner: acme
    hosts: ["weather.example.com"]
"""


def load(tmp_path: Path, text: str) -> gwconfig.ServerConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, env={}).servers["weather"]


def test_the_fair_share_options_default_to_half_the_connections_and_a_ten_second_wait(tmp_path: Path) -> None:
    server = load(tmp_path, MINIMAL)
    assert (server.max_key_share, server.upstream_queue_timeout_s) == (0.5, 10.0)
    server = load(tmp_path, MINIMAL + "    max_key_share: 0.25\n    upstream_queue_timeout_s: 3\n")
    assert (server.max_key_share, server.upstream_queue_timeout_s) == (0.25, 3.0)
    assert load(tmp_path, MINIMAL + "    max_key_share: 1\n    upstream_queue_timeout_s: 0\n").max_key_share == 1.0
    # the wait is part of the wait for an answer: by default it stays within read_timeout_s
    assert load(tmp_path, MINIMAL + "    read_timeout_s: 4\n").upstream_queue_timeout_s == 4.0


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("max_key_share: 0", "greater than 0 and at most 1"),
        ("max_key_share: 1.5", "greater than 0 and at most 1"),
        ("max_key_share: -0.5", "greater than 0 and at most 1"),
        ("max_key_share: .nan", "greater than 0 and at most 1"),
        ('max_key_share: "50%"', "fraction such as 0.5"),
        ("upstream_queue_timeout_s: -1", "0 or more"),
        ("upstream_queue_timeout_s: soon", "number of seconds"),
        ("upstream_queue_timeout_s: 400", "must not exceed servers.weather.read_timeout_s (300)"),
        ("max_key_share: 1" + "0" * 400, "greater than 0 and at most 1"),  # too large for a float
        ("read_timeout_s: 1" + "0" * 400, "finite number"),
    ],
)
def test_a_bad_fair_share_option_is_an_error_with_its_line(tmp_path: Path, line: str, words: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(MINIMAL + f"    {line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.line == 9
    assert line.split(":")[0] in info.value.message
    assert words in info.value.message


def test_every_server_option_is_documented_in_the_example_config_and_the_new_ones_in_the_readme() -> None:
    example = (REPO / "config" / "gateway.yaml").read_text()
    readme = (REPO / "README.md").read_text()
    keys: tuple[str, ...] = gwconfig.__dict__["_SERVER_KEYS"]
    assert [key for key in keys if f"{key}:" not in example] == []
    assert all(f"`{key}`" in readme for key in ("max_key_share", "upstream_queue_timeout_s"))
