"""SSE runs: relay delay (upstream write → client read) and memory with many open streams."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from bench.loadgen import BASE_HEADERS, percentile, tool_call_body
from bench.procs import Proc


async def relay_delay(
    url: str, headers: dict[str, str], *, calls: int, concurrency: int, ticks: int, interval_ms: float
) -> dict[str, Any]:
    """``calls`` tools/calls (``concurrency`` at a time) whose SSE answers carry ``ticks`` progress
    events stamped with the upstream's monotonic clock when written; the delay of each event is the
    client's monotonic clock when it read the event minus that stamp."""
    delays: list[float] = []
    failures = 0
    body = json.loads(tool_call_body("get_forecast"))
    body["params"]["arguments"] = {"city": "Paris", "ticks": ticks, "interval_ms": interval_ms}
    payload = json.dumps(body).encode()
    sem = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

        async def one() -> None:
            nonlocal failures
            async with sem:
                got_result = False
                try:
                    async with http.post(url, data=payload, headers={**BASE_HEADERS, **headers}) as resp:
                        if resp.status != 200:
                            failures += 1
                            return
                        while True:
                            line = await resp.content.readline()
                            if not line:
                                break
                            now = time.monotonic_ns()
                            if not line.startswith(b"data:"):
                                continue
                            value = json.loads(line[5:])
                            stamp = (value.get("params") or {}).get("t_ns")
                            if stamp is None:
                                stamp = ((value.get("result") or {}).get("_meta") or {}).get("t_ns")
                                got_result = got_result or "result" in value
                            if stamp is not None:
                                delays.append((now - stamp) / 1e6)
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    failures += 1
                    return
                if not got_result:
                    failures += 1

        await asyncio.gather(*(one() for _ in range(calls)))
    return {
        "events": len(delays),
        "calls": calls,
        "concurrency": concurrency,
        "failures": failures,
        "p50_ms": round(percentile(delays, 50), 3),
        "p99_ms": round(percentile(delays, 99), 3),
        "max_ms": round(max(delays), 3) if delays else 0.0,
    }


async def hold_streams(
    url: str, headers: dict[str, str], n: int, proc: Proc, *, hold_s: float = 3.0, open_parallel: int = 200
) -> dict[str, Any]:
    """Open ``n`` standalone SSE GET streams through ``proc`` and keep them open; the RSS of
    ``proc`` before, with all open, and its peak."""
    before_kb = proc.rss_kb()
    opened = 0
    failed: list[str] = []
    responses: list[aiohttp.ClientResponse] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    sem = asyncio.Semaphore(open_parallel)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def one() -> None:
            nonlocal opened
            async with sem:
                try:
                    resp = await http.get(url, headers={"Accept": "text/event-stream", **headers})
                    if resp.status != 200:
                        failed.append(f"HTTP {resp.status}")
                        resp.release()
                        return
                    first = await asyncio.wait_for(resp.content.readline(), 30)
                    if not first.startswith(b":"):
                        failed.append(f"unexpected first line {first[:40]!r}")
                    responses.append(resp)
                    opened += 1
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    failed.append(type(exc).__name__)

        await asyncio.gather(*(one() for _ in range(n)))
        open_s = time.perf_counter() - started
        await asyncio.sleep(hold_s)
        with_kb = proc.rss_kb()
        peak_kb = proc.sample()
        for resp in responses:
            resp.close()
    per_stream = (with_kb - before_kb) / opened if opened else 0.0
    reasons: dict[str, int] = {}
    for reason in failed:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "requested": n,
        "opened": opened,
        "failed": len(failed),
        "failure_reasons": reasons,
        "open_seconds": round(open_s, 2),
        "rss_before_mb": round(before_kb / 1024, 1),
        "rss_open_mb": round(with_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "kb_per_stream": round(per_stream, 1),
        "rss_at_10k_mb_extrapolated": round((before_kb + per_stream * 10_000) / 1024, 1),
    }
