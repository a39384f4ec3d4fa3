"""The lifecycle of the gateway's stdio children: one per session, stopped with their session
(DELETE, idle timeout, drain, exit), refused at max_processes, and misbehaving ones stopped alone.
Real processes, real HTTP, real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from mcp.shared.exceptions import MCPError

from gateway.app import create_app, server_options
from gateway.config import load_config
from gateway.money import parse_cents
from gateway.proxy.exchange import UPSTREAMS
from gateway.stdio import StdioUpstream
from tests.harness import Gateway, GatewayTestServer, run_gateway, tool_call
from tests.stdio.conftest import alive, sdk_client, stdio_config, wait_for

LINE_SERVER = [sys.executable, "-m", "tests.stdio.line_server"]
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
}
ACCEPT = "application/json, text/event-stream"


class RawSession:
    """One MCP session over plain HTTP (aiohttp), to see statuses, headers and bodies as they are."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self.http, self.url, self.key = http, url, key
        self.session_id: str | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.key}", "Accept": ACCEPT, "Content-Type": "application/json"}
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
        return headers

    async def post(self, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.http.post(self.url, data=json.dumps(body), headers=self.headers()) as resp:
            text = await resp.text()
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
                return resp.status, [json.loads(e) for e in events]
            return resp.status, (json.loads(text) if text else None)

    async def initialize(self) -> None:
        async with self.http.post(self.url, data=json.dumps(INIT), headers=self.headers()) as resp:
            assert resp.status == 200, await resp.text()
            self.session_id = resp.headers["Mcp-Session-Id"]
        status, _ = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert status == 202

    async def pid(self) -> int:
        status, body = await self.post(tool_call("pid"))
        assert status == 200, body
        return int(body["result"]["content"][0]["text"])


@asynccontextmanager
async def replica(config_path: Path) -> AsyncIterator[str]:
    """A second gateway process's app on the same config and ledger (a replica); yields its MCP URL."""
    config = load_config(config_path)
    server = GatewayTestServer(create_app(config), header_timeout_s=config.client_header_timeout_s, host="127.0.0.1")
    options = server_options(config)
    del options["handler_cancellation"]
    await server.start_server(**options)
    try:
        yield str(server.make_url("/weather/mcp"))
    finally:
        await server.close()


def upstream_of(gw: Gateway) -> StdioUpstream:
    upstream = gw.server.app[UPSTREAMS]["weather"]
    assert isinstance(upstream, StdioUpstream)
    return upstream


async def test_each_session_gets_its_own_child_and_delete_stops_it(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        one, two = RawSession(http, gw.url(), key), RawSession(http, gw.url(), key)
        await one.initialize()
        await two.initialize()
        pid_one, pid_two = await one.pid(), await two.pid()
        assert pid_one != pid_two
        async with http.delete(gw.url(), headers=one.headers()) as resp:
            assert resp.status == 200
        await wait_for(lambda: not alive(pid_one))
        status, body = await one.post(tool_call("pid"))
        assert status == 404 and "has ended" in body["error"]["message"]
        assert await two.pid() == pid_two


async def test_a_child_killed_mid_call_voids_the_call_ends_the_session_and_a_new_session_works(tmp_path: Path) -> None:
    marker = tmp_path / "release"
    async with run_gateway(stdio_config(tmp_path)) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        call = asyncio.ensure_future(raw.post(tool_call("wait_for_file", {"path": str(marker)})))
        pid_file = Path(f"{marker}.pid")
        await wait_for(pid_file.exists)
        await wait_for(lambda: pid_file.read_text() != "")
        assert await gw.held("alice") == parse_cents("5")
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
        status, body = await call
        assert status == 200
        answer = body[0] if isinstance(body, list) else body
        assert answer["error"]["data"]["code"] == "stdio_server_stopped"
        status, body = await raw.post(tool_call("pid"))
        assert status == 404
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("100") and await gw.held("alice") == 0
        fresh = RawSession(http, gw.url(), key)
        await fresh.initialize()
        assert await fresh.pid() > 0


async def test_a_tool_that_exits_the_process_mid_call_is_not_charged(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        async with sdk_client(gw.url(), key) as client:
            with pytest.raises(MCPError):  # the error the gateway sends, or the SDK's own when its GET
                await client.call_tool("crash", {})  # stream finds the session gone first
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("100")


async def test_twenty_concurrent_sessions_each_run_their_own_child(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw:
        key = await gw.new_user("alice", "100")
        upstream = upstream_of(gw)
        ready = asyncio.Event()
        pids: list[int] = []

        async def session() -> None:
            async with sdk_client(gw.url(), key) as client:
                result = await client.call_tool("pid", {})
                pids.append(int(result.content[0].text))  # type: ignore[union-attr]
                if len(pids) == 20:
                    ready.set()
                await ready.wait()  # every session is open at once

        started = time.monotonic()
        async with asyncio.timeout(120):
            await asyncio.gather(*(session() for _ in range(20)))
        elapsed = time.monotonic() - started
        assert len(set(pids)) == 20
        print(f"\n20 concurrent stdio sessions opened and called in {elapsed:.2f}s")
        await wait_for(lambda: not upstream.sessions)  # each client's DELETE ended its session
        await wait_for(lambda: not any(alive(pid) for pid in pids))


async def test_a_new_session_at_max_processes_is_refused_with_a_clear_503(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=LINE_SERVER, max_processes=2, warm_processes=0, max_key_share=1)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        first, second = RawSession(http, gw.url(), key), RawSession(http, gw.url(), key)
        await first.initialize()
        await second.initialize()
        third = RawSession(http, gw.url(), key)
        status, body = await third.post(INIT)
        assert status == 503
        assert "max_processes" in body["error"]["message"] and body["error"]["data"]["code"] == "stdio_capacity"
        async with http.delete(gw.url(), headers=first.headers()) as resp:
            assert resp.status == 200
        await wait_for(lambda: len(upstream_of(gw).children) < 2)
        await third.initialize()


async def test_a_key_at_its_share_of_max_processes_gives_up_its_idle_session_or_is_refused(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, max_processes=4, warm_processes=0)  # max_key_share 0.5: 2 sessions a key
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        greedy, other = await gw.new_user("greedy", "100"), await gw.new_user("other", "100")
        first, second, third = (RawSession(http, gw.url(), greedy) for _ in range(3))
        await first.initialize()
        await second.initialize()
        busy = [asyncio.ensure_future(first.post(tool_call("wait_for_file", {"path": str(tmp_path / "a")})))]
        await wait_for(Path(f"{tmp_path / 'a'}.pid").exists)
        await third.initialize()  # at its share: its idle session (second) ends to make room
        status, _ = await second.post(tool_call("pid"))
        assert status == 404
        busy.append(asyncio.ensure_future(third.post(tool_call("wait_for_file", {"path": str(tmp_path / "b")}))))
        await wait_for(Path(f"{tmp_path / 'b'}.pid").exists)
        status, body = await RawSession(http, gw.url(), greedy).post(INIT)  # both in calls: refused
        assert status == 503 and body["error"]["data"]["code"] == "stdio_key_share"
        await RawSession(http, gw.url(), other).initialize()  # another key is not affected
        (tmp_path / "a").write_text("go")
        (tmp_path / "b").write_text("go")
        for status, _ in await asyncio.gather(*busy):
            assert status == 200
        await gw.verify_clean()
        assert await gw.balance("greedy") == parse_cents("90")


async def test_an_idle_session_is_reaped_and_its_child_stopped(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=LINE_SERVER, idle_timeout_s=0.3, warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        pid = await raw.pid()
        await wait_for(lambda: not alive(pid))
        assert upstream_of(gw).sessions == {}
        status, body = await raw.post(tool_call("pid"))
        assert status == 404 and body["error"]["data"]["code"] == "session_not_found"


async def test_drain_stops_every_child_and_kills_one_that_ignores_sigterm(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=[*LINE_SERVER, "--ignore-sigterm"], stop_grace_s=0.3, warm_processes=0)
    async with aiohttp.ClientSession() as http:
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            sessions = [RawSession(http, gw.url(), key) for _ in range(3)]
            for raw in sessions:
                await raw.initialize()
            pids = [await raw.pid() for raw in sessions]
            os.kill(pids[0], signal.SIGTERM)  # ignored: it is still there
            assert all(alive(pid) for pid in pids)
        # The gateway has stopped: its drain SIGTERMed them, then SIGKILLed them after the grace.
        assert not any(alive(pid) for pid in pids)


async def test_a_child_writing_a_line_that_is_not_json_is_stopped_without_affecting_others(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=[*LINE_SERVER, "--garbage-on-call"], warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        bad, good = RawSession(http, gw.url(), key), RawSession(http, gw.url(), key)
        await bad.initialize()
        await good.initialize()
        status, body = await bad.post(tool_call("pid"))
        assert status == 200 and "not JSON" in body["error"]["message"]
        status, _ = await bad.post(tool_call("pid"))
        assert status == 404
        status, body = await good.post({"jsonrpc": "2.0", "id": 5, "method": "tools/list"})
        assert status == 200 and body["result"]["tools"][0]["name"] == "pid"


async def test_a_child_writing_a_line_over_max_body_bytes_is_stopped(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=[*LINE_SERVER, "--huge-on-call", "200000"], warm_processes=0)
    text = config.read_text().replace("database:", "max_body_bytes: 65536\ndatabase:", 1)
    config.write_text(text)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        status, body = await raw.post(tool_call("pid"))
        assert status == 200 and "more than 65536 bytes" in body["error"]["message"]
        assert upstream_of(gw).sessions == {}


async def test_a_session_of_another_gateway_process_gets_a_404_naming_the_cause(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=LINE_SERVER, warm_processes=0)
    config.write_text(config.read_text() + 'session_secret: "shared-by-both-replicas"\n')
    async with run_gateway(config) as first, replica(config) as second_url, aiohttp.ClientSession() as http:
        key = await first.new_user("alice", "100")
        raw = RawSession(http, first.url(), key)
        await raw.initialize()
        raw.url = second_url
        status, body = await raw.post(tool_call("pid"))
        assert status == 404
        assert "another gateway process" in body["error"]["message"]
        assert "affinity" in body["error"]["data"]["hint"]


async def test_a_child_flooding_requests_nobody_reads_is_stopped_without_affecting_others(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=[*LINE_SERVER, "--flood-after-call", "1500"], warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        flooder, other = RawSession(http, gw.url(), key), RawSession(http, gw.url(), key)
        await flooder.initialize()
        await other.initialize()
        flooding_pid = await flooder.pid()  # answered, then 1500 requests with no stream to take them
        await wait_for(lambda: not alive(flooding_pid))
        status, _ = await flooder.post(tool_call("pid"))
        assert status == 404
        status, body = await other.post({"jsonrpc": "2.0", "id": 5, "method": "tools/list"})
        assert status == 200 and body["result"]["tools"][0]["name"] == "pid"


async def test_the_childs_stderr_is_logged_tagged_with_server_and_session_within_a_budget(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=[*LINE_SERVER, "--stderr-lines", "2000"], warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        with structlog.testing.capture_logs() as logs:
            raw = RawSession(http, gw.url(), key)
            await raw.initialize()
            await wait_for(lambda: any(e["event"] == "stdio_stderr_truncated" for e in logs))
        lines = [e for e in logs if e["event"] == "stdio_stderr"]
        assert lines[0]["line"].startswith("log line 00000") and lines[0]["server"] == "weather"
        assert lines[0]["session"] == raw.session_id[:16]  # type: ignore[index]
        assert sum(len(e["line"]) + 1 for e in lines) <= 64 * 1024
        assert len(lines) < 2000


async def test_a_call_whose_client_went_away_is_delivered_and_charged_on_the_sessions_next_stream(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "release"
    async with run_gateway(stdio_config(tmp_path)) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        with structlog.testing.capture_logs() as logs:
            call = asyncio.ensure_future(raw.post(tool_call("wait_for_file", {"path": str(marker)}, rid=77)))
            await wait_for(Path(f"{marker}.pid").exists)
            call.cancel()  # the client goes away mid-call: the hold is parked, not voided
            await wait_for(lambda: any(e.get("parked") for e in logs))
        marker.write_text("go")
        async with http.get(gw.url(), headers=raw.headers()) as stream:
            assert stream.status == 200
            async for line in stream.content:
                if line.startswith(b"data:") and b'"id":77' in line.replace(b" ", b""):
                    answer = json.loads(line[5:])
                    break
        assert answer["result"]["content"][0]["text"] == "released"
        assert answer["result"]["_meta"]["io.agentpay/receipt"]["amount_cents"] == "5"
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("95")


async def test_a_call_whose_client_went_away_for_good_is_voided_when_its_window_ends(tmp_path: Path) -> None:
    marker = tmp_path / "release"
    config = stdio_config(tmp_path)
    config.write_text(config.read_text() + "resume_window_s: 0.3\nsweep_interval_s: 0.1\n")
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        with structlog.testing.capture_logs() as logs:
            call = asyncio.ensure_future(raw.post(tool_call("wait_for_file", {"path": str(marker)})))
            await wait_for(Path(f"{marker}.pid").exists)
            call.cancel()
            await wait_for(lambda: any(e.get("parked") for e in logs))
        marker.write_text("go")  # its answer goes to the session's backlog; no stream ever takes it
        await gw.verify_clean()
        assert await gw.balance("alice") == parse_cents("100") and await gw.held("alice") == 0


async def test_the_legacy_sse_endpoints_are_not_served_for_a_stdio_server(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        url = gw.url().replace("/mcp", "/sse")
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 404
            assert "Streamable HTTP only" in (await resp.json())["error"]["message"]


async def test_configured_rlimits_are_applied_in_the_child(tmp_path: Path) -> None:
    rlimits = {"address_space_mb": 2048, "cpu_s": 120, "open_files": 64}
    config = stdio_config(tmp_path, command=LINE_SERVER, rlimits=rlimits, warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        status, body = await raw.post(tool_call("limits"))
        assert status == 200
        assert json.loads(body["result"]["content"][0]["text"]) == [2048 * 1024 * 1024, 120, 64]


async def test_a_command_that_cannot_start_is_a_502_that_charges_nothing(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=[str(tmp_path / "no-such-server")], warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        status, body = await RawSession(http, gw.url(), key).post(INIT)
        assert status == 502 and body["error"]["data"]["code"] == "stdio_start_failed"
        assert "could not be started" in body["error"]["message"]


def modern_call(name: str, arguments: dict[str, Any], rid: int, token: str) -> dict[str, Any]:
    """A 2026-07-28 (stateless) tools/call asking for progress under ``token``."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
        "progressToken": token,
    }
    return {
        "jsonrpc": "2.0",
        "id": rid,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": meta},
    }


async def test_two_keys_sharing_a_stateless_child_each_see_only_their_own_progress(tmp_path: Path) -> None:
    async with run_gateway(stdio_config(tmp_path)) as gw, aiohttp.ClientSession() as http:
        alice, bob = await gw.new_user("alice", "100"), await gw.new_user("bob", "100")
        results = await asyncio.gather(
            RawSession(http, gw.url(), alice).post(modern_call("slow_count", {"steps": 5}, 1, "same")),
            RawSession(http, gw.url(), bob).post(modern_call("slow_count", {"steps": 3}, 1, "same")),
        )
        assert len(upstream_of(gw).shared) == 1  # one child served both
        for (status, events), steps in zip(results, (5, 3), strict=True):
            assert status == 200
            progress = [e["params"] for e in events if e.get("method") == "notifications/progress"]
            assert [p["progress"] for p in progress] == list(range(1, steps + 1))
            assert {p["progressToken"] for p in progress} == {"same"} and {p["total"] for p in progress} == {steps}
            assert events[-1]["result"]["content"][0]["text"] == f"counted to {steps}"


async def test_the_metrics_count_each_stdio_servers_children_and_sessions(tmp_path: Path) -> None:
    config = stdio_config(tmp_path, command=LINE_SERVER, warm_processes=0)
    async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        for _ in range(2):
            await RawSession(http, gw.url(), key).initialize()
        text = gw.rt.metrics.render().decode()
        assert 'agentpay_stdio_processes{server="weather"} 2.0' in text
        assert 'agentpay_stdio_sessions{server="weather"} 2.0' in text
