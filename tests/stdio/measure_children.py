"""Measure what a stdio child costs behind the gateway: cold start (``initialize`` answered through
the gateway, no warm child), resident memory per child (its whole process group), and N sessions
open at once, each with its own child.

    python -m tests.stdio.measure_children [--sessions 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from gateway.proxy.exchange import UPSTREAMS
from gateway.stdio import StdioUpstream
from tests.clients.npm import ensure_installed
from tests.harness import run_gateway
from tests.stdio.conftest import FASTMCP, stdio_config
from tests.stdio.test_children import RawSession


def group_rss_kib(pgid: int) -> int:
    """Resident memory of every process in the process group (npx → node, python → python)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            status = (stat.parent / "status").read_text()
        except (OSError, IndexError, ValueError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


async def measure(name: str, command: list[str], sessions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = stdio_config(Path(tmp), command=command, warm_processes=0, max_processes=sessions, max_key_share=1)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
            key = await gw.new_user("alice", "100")
            upstream = gw.server.app[UPSTREAMS]["weather"]
            assert isinstance(upstream, StdioUpstream)
            starts = []
            for _ in range(5):  # cold starts, one at a time
                raw = RawSession(http, gw.url(), key)
                began = time.perf_counter()
                await raw.initialize()
                starts.append(time.perf_counter() - began)
                async with http.delete(gw.url(), headers=raw.headers()):
                    pass
            opened = [RawSession(http, gw.url(), key) for _ in range(sessions)]
            began = time.perf_counter()
            await asyncio.gather(*(raw.initialize() for raw in opened))
            all_open = time.perf_counter() - began
            await asyncio.gather(*(raw.post({"jsonrpc": "2.0", "id": 9, "method": "tools/list"}) for raw in opened))
            rss = [group_rss_kib(channel.child.pid) for channel in upstream.sessions.values()]
            print(
                f"{name}: cold start (initialize through the gateway) median {statistics.median(starts) * 1000:.0f} ms "
                f"(min {min(starts) * 1000:.0f}, max {max(starts) * 1000:.0f}); "
                f"RSS per child median {statistics.median(rss) / 1024:.1f} MiB; "
                f"{len(upstream.sessions)} sessions open at once, each its own child, opened in {all_open:.1f}s; "
                f"total RSS {sum(rss) / 1024:.0f} MiB",
                flush=True,
            )


async def main(sessions: int) -> None:
    tools = ensure_installed()
    await measure("FastMCP (python, mcp SDK)", FASTMCP, sessions)
    await measure("server-everything (node)", [str(tools.node), str(tools.everything_server), "stdio"], sessions)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=50)
    asyncio.run(main(parser.parse_args().sessions))
