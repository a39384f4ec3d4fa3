"""Load generators: wrk with a Lua script when wrk is installed, else a Python (aiohttp) generator.

Both POST one JSON-RPC ``tools/call`` over keep-alive connections for a fixed time and report the
same figures: requests completed, ``ok`` (HTTP 200 whose body carries a ``result`` that is not
``isError: true``), ``sent`` (requests written, including those cut off at the end), requests/s,
and latency percentiles in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class Target:
    """What one request looks like for one contender."""

    url: str
    headers: dict[str, str]
    body: bytes


def tool_call_body(tool: str, city: str = "Paris", rid: int = 1) -> bytes:
    params = {"name": tool, "arguments": {"city": city}}
    message = {"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params}
    return json.dumps(message, separators=(",", ":")).encode()


BASE_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


@dataclass
class LoadResult:
    tool: str  # "wrk" or "python"
    connections: int
    duration_s: float
    requests: int
    ok: int
    sent: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_OK_BODY = re.compile(rb'"result"')
_TOOL_ERROR = re.compile(rb'"isError"\s*:\s*true')

_LUA = r"""
wrk.method = "POST"
wrk.body = __BODY__
__HEADERS__
ok_count = 0
sent_count = 0
local threads = {}
function setup(thread)
  table.insert(threads, thread)
end
function request()
  sent_count = sent_count + 1
  return wrk.format()
end
function response(status, headers, body)
  if status == 200 and string.find(body, '"result"', 1, true) and not string.find(body, '"isError"%s*:%s*true') then
    ok_count = ok_count + 1
  end
end
function done(summary, latency, requests)
  local ok, sent = 0, 0
  for _, t in ipairs(threads) do
    ok = ok + t:get("ok_count")
    sent = sent + t:get("sent_count")
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"ok":%d,"sent":%d,"errors":%d,' ..
    '"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, ok, sent,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
"""


def _lua_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def wrk_script(target: Target) -> str:
    headers = "\n".join(
        f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in {**BASE_HEADERS, **target.headers}.items()
    )
    return _LUA.replace("__BODY__", _lua_string(target.body.decode())).replace("__HEADERS__", headers)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


async def run_wrk(target: Target, connections: int, duration_s: float, timeout_s: float = 10.0) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_script(target))
    try:
        argv = [
            "wrk",
            "-t1",  # one thread drives up to 32 keep-alive connections: wrk stays far below one core
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={timeout_s:g}s",
            "-s",
            script.name,
            target.url,
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
    finally:
        os.unlink(script.name)
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    duration = data["duration_us"] / 1e6
    return LoadResult(
        tool="wrk",
        connections=connections,
        duration_s=round(duration, 3),
        requests=data["requests"],
        ok=data["ok"],
        sent=data["sent"],
        errors=data["errors"],
        rps=data["requests"] / duration if duration else 0.0,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        max_ms=data["max_us"] / 1000,
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


async def run_python(target: Target, connections: int, duration_s: float, timeout_s: float = 10.0) -> LoadResult:
    """N concurrent keep-alive connections, each sending the next request when the last answered."""
    latencies: list[float] = []
    counts = {"ok": 0, "sent": 0, "errors": 0}
    headers = {**BASE_HEADERS, **target.headers}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)) as http:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                counts["sent"] += 1
                try:
                    async with http.post(target.url, data=target.body, headers=headers) as resp:
                        body = await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    counts["errors"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if status == 200 and _OK_BODY.search(body) and not _TOOL_ERROR.search(body):
                    counts["ok"] += 1
                elif status != 200:
                    counts["errors"] += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ms = [x * 1000 for x in latencies]
    return LoadResult(
        tool="python",
        connections=connections,
        duration_s=round(elapsed, 3),
        requests=len(ms),
        ok=counts["ok"],
        sent=counts["sent"],
        errors=counts["errors"],
        rps=len(ms) / elapsed if elapsed else 0.0,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        mean_ms=sum(ms) / len(ms) if ms else 0.0,
        max_ms=max(ms) if ms else 0.0,
    )


async def run_load(target: Target, connections: int, duration_s: float, *, use_wrk: bool) -> LoadResult:
    if use_wrk:
        return await run_wrk(target, connections, duration_s)
    return await run_python(target, connections, duration_s)


async def probe(target: Target) -> tuple[int, str]:
    """One request: (status, body text) — to check a contender answers the call correctly."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
        http.post(target.url, data=target.body, headers={**BASE_HEADERS, **target.headers}) as resp,
    ):
        return resp.status, (await resp.read()).decode(errors="replace")


def probe_ok(status: int, body: str) -> bool:
    raw = body.encode()
    return status == 200 and bool(_OK_BODY.search(raw)) and not _TOOL_ERROR.search(raw)
