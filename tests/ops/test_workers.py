"""``agentpay serve --workers N``: N processes share the port, every call is billed once, a worker
that dies is replaced, and SIGTERM drains them all."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from gateway.api.operations import Operations
from gateway.ledger.base import AccountKind
from gateway.ledger.interfaces import Ledger
from gateway.money import parse_cents
from tests.harness import new_user, prepare_ledger, prepared_ledger, tool_call, write_config
from tests.process import GatewayProcess, run_gateway_process
from tests.upstream_sdk import run_upstream

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


async def workers_ready(gw: GatewayProcess, count: int, not_in: frozenset[int] = frozenset()) -> set[int]:
    """The supervisor's worker pids once ``count`` of them (none of ``not_in``) answer /readyz."""
    async with asyncio.timeout(30):
        while True:
            pids = children(gw.proc.pid)
            if len(pids) == count and not pids & not_in:
                return pids
            await asyncio.sleep(0.05)  # polling processes we do not control; bounded by the timeout


async def settled(ledger: Ledger) -> None:
    async with asyncio.timeout(30):
        while True:
            if not (await ledger.get_account(AccountKind.USER, "alice")).held:
                return
            await asyncio.sleep(0.02)  # another process settles; bounded by the timeout


async def paid_calls(gw: GatewayProcess, key: str, n: int) -> list[int]:
    async def one(i: int) -> int:
        # A connection per call, so the kernel spreads them over the workers.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
            body = tool_call("get_forecast", {"city": f"c{i}"})
            async with http.post(gw.url(), json=body, headers={**HEADERS, "Authorization": f"Bearer {key}"}) as resp:
                payload = await resp.json()
                assert "result" in payload and not payload["result"].get("isError"), payload
                return resp.status

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_two_workers_bill_every_call_once_survive_a_killed_worker_and_drain_on_sigterm(
    tmp_path: Path,
) -> None:
    async with run_upstream(json_response=True, stateless=True) as up:
        config = write_config(tmp_path, {"weather": up.url})
        async with prepared_ledger(config) as ledger:
            key = await new_user(Operations(ledger), "alice", "1000")
            async with run_gateway_process(config, serve_args=["--workers", "2"]) as gw:
                first = await workers_ready(gw, 2)
                assert await paid_calls(gw, key, 30) == [200] * 30

                # Captures run after the answer is written: let them land before killing a worker
                # (a SIGKILL loses in-flight captures: unbilled, never twice; tests/faults covers it).
                await settled(ledger)
                victim = min(first)
                os.kill(victim, signal.SIGKILL)
                second = await workers_ready(gw, 2, not_in=frozenset({victim}))
                # The replacement binds the same port; calls keep succeeding through both workers.
                assert await paid_calls(gw, key, 10) == [200] * 10

                assert await gw.stop(signal.SIGTERM) == 0
                for pid in second:  # every worker drained and exited with its supervisor
                    assert not Path(f"/proc/{pid}").exists()
            account = await ledger.get_account(AccountKind.USER, "alice")
            assert account.balance == parse_cents("1000") - 40 * parse_cents("5")
            assert account.held == 0
            assert await ledger.verify() == []


async def test_workers_below_one_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(config),
        "serve",
        "--workers",
        "0",
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 1
    assert b"--workers must be at least 1" in err


async def test_workers_do_not_outlive_a_killed_supervisor(tmp_path: Path) -> None:
    async with run_upstream(json_response=True, stateless=True) as up:
        config = write_config(tmp_path, {"weather": up.url})
        await prepare_ledger(config)
        async with run_gateway_process(config, serve_args=["--workers", "2"]) as gw:
            pids = await workers_ready(gw, 2)
            assert await gw.stop(signal.SIGKILL) == -signal.SIGKILL
            async with asyncio.timeout(30):
                while True:
                    if not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids):
                        return
                    await asyncio.sleep(0.05)  # the orphaned workers drain and exit; bounded by the timeout


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return "zombie"
