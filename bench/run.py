"""AgentPay performance benchmark: one command, every contender, the same run.

    python -m bench.run [--quick] [--out bench/results]

Installs what it needs (see ``bench/install.py``), then, on loopback only:

1. per upstream (the minimal aiohttp server, then the FastMCP server), starts every contender in
   front of it and drives each with wrk (Python generator without wrk): throughput and latency at
   32 connections, latency at 1 connection, in interleaved rounds (median of the rounds), peak
   RSS; then checks the paid AgentPay runs (``agentpay ledger verify``, charges vs successful calls)
   and profiles the paid SQLite path with py-spy;
2. the ledger micro-benchmark (hold + capture through ``gateway.ledger``, SQLite and PostgreSQL);
3. the SSE relay delay (AgentPay vs direct vs the reference);
4. the memory run (gateway RSS with N open SSE streams);
5. the scale run (paid-call latency with a large ledger vs an empty one).

Writes ``results.json`` and ``results.md`` into the out dir and prints the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import aiohttp

from bench import agentpay, contenders, install, loadgen, profile, report, scale, sse
from bench.contenders import Contender, Upstream
from bench.procs import PY, ROOT, Proc, cpu_seconds, raise_nofile, stop_all


@dataclass(frozen=True)
class Params:
    name: str
    rounds: int
    warmup_s: float
    c32_s: float
    c1_s: float
    ledger_s: float
    ledger_callers: tuple[int, ...]
    relay_calls_c1: int
    relay_calls_c16: int
    memory_streams: int
    scale_sqlite: scale.Scale
    scale_pg: scale.Scale | None
    scale_rounds: int
    profile_s: int
    exact_calls: int
    litellm_on_aiohttp: bool


FULL = Params(
    name="full",
    rounds=3,
    warmup_s=2,
    c32_s=6,
    c1_s=5,
    ledger_s=5,
    ledger_callers=(1, 32, 256),
    relay_calls_c1=60,
    relay_calls_c16=480,  # 10,080 events over ~3 s: enough for a stable p99
    memory_streams=10_000,
    scale_sqlite=scale.FULL,
    scale_pg=scale.Scale(users=10_000, keys=100_000, charges=500_000),
    scale_rounds=3,
    profile_s=10,
    exact_calls=1000,
    litellm_on_aiohttp=True,
)
QUICK = Params(
    name="quick",
    rounds=1,
    warmup_s=1,
    c32_s=2,
    c1_s=2,
    ledger_s=2,
    ledger_callers=(32,),
    relay_calls_c1=10,
    relay_calls_c16=32,
    memory_streams=1000,
    scale_sqlite=scale.QUICK,
    scale_pg=None,
    scale_rounds=1,
    profile_s=3,
    exact_calls=100,
    litellm_on_aiohttp=False,
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- machine -----------------------------------------------------------------------------------


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else None


def machine(tools: install.Tools) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "gateway"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "sqlite": sqlite3.sqlite_version,
        "wrk": _version(["wrk", "-v"]) if tools.wrk is None else None,
        "nginx": _version(["nginx", "-v"]) if tools.nginx is None else None,
        "fastmcp": _version([str(tools.fastmcp_python), "-c", "import fastmcp; print(fastmcp.__version__)"])
        if tools.fastmcp is None
        else None,
        "litellm": _version(
            [
                str(install.VENVS / "litellm" / "bin" / "python"),
                "-c",
                "from importlib.metadata import version; print(version('litellm'))",
            ]
        )
        if tools.litellm is None
        else None,
        "postgres": _version(["psql", "--version"]),
        "commit": f"{commit}{' + uncommitted gateway changes' if dirty.stdout.strip() else ''}",
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nofile": raise_nofile(),
    }


# --- contenders ---------------------------------------------------------------------------------


async def start_contender(c: Contender, ready_s: float = 90) -> None:
    try:
        if c.gateway is not None:
            await asyncio.to_thread(c.gateway.setup)
            contenders.finish_agentpay(c)
        if c.proc is not None:
            c.proc.start()
            await c.proc.wait_ready(ready_s, c.ready_path)
        assert c.target is not None
        status, body = await loadgen.probe(c.target)
        if not loadgen.probe_ok(status, body):
            raise RuntimeError(f"a tools/call through it answered HTTP {status}: {body[:300]}")
        if c.gateway is not None:
            c.gateway.ok_total += 1
            c.gateway.sent_total += 1
    except Exception as exc:  # noqa: BLE001 - a contender that cannot run is reported, not fatal
        c.unavailable = f"did not start: {type(exc).__name__}: {str(exc)[:600]}"
        log(f"{c.key}: UNAVAILABLE - {c.unavailable}")
        if c.proc is not None:
            c.proc.stop()


def owner_proc(c: Contender, up: Upstream) -> Proc:
    return c.proc if c.proc is not None else up.proc


async def quiesce(procs: list[Proc], *, below: float = 0.08, window_s: float = 0.3, limit_s: float = 90) -> float:
    """Wait until these processes are idle (a contender may still be working through requests that
    the last run abandoned, e.g. a backlog of slow proxied calls); returns the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < limit_s:
        before = sum(cpu_seconds(p.pid) for p in procs if p.alive())
        await asyncio.sleep(window_s)
        if (sum(cpu_seconds(p.pid) for p in procs if p.alive()) - before) / window_s < below:
            break
    return round(time.perf_counter() - started, 2)


async def measure(c: Contender, up: Upstream, p: Params, use_wrk: bool, rnd: int) -> None:
    assert c.target is not None
    proc = owner_proc(c, up)
    idle = [proc, up.proc]
    waited = await quiesce(idle)
    warm = await loadgen.run_load(c.target, 32, p.warmup_s, use_wrk=use_wrk)
    waited += await quiesce(idle)  # slow proxies are still working through the abandoned warm-up calls
    cpu0, up0 = cpu_seconds(proc.pid), cpu_seconds(up.proc.pid)
    m32 = await loadgen.run_load(c.target, 32, p.c32_s, use_wrk=use_wrk)
    cpu1, up1 = cpu_seconds(proc.pid), cpu_seconds(up.proc.pid)
    waited += await quiesce(idle)
    m1 = await loadgen.run_load(c.target, 1, p.c1_s, use_wrk=use_wrk)
    if c.gateway is not None:
        for m in (warm, m32, m1):
            c.gateway.ok_total += m.ok
            c.gateway.sent_total += m.sent
    c.peak_kb = proc.sample()
    c.runs.append(
        {
            "round": rnd,
            "c32": m32.as_dict(),
            "c1": m1.as_dict(),
            "cpu_pct_c32": round(100 * (cpu1 - cpu0) / m32.duration_s, 1) if m32.duration_s else None,
            "upstream_cpu_pct_c32": round(100 * (up1 - up0) / m32.duration_s, 1) if m32.duration_s else None,
            "quiesce_s": waited,
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }
    )
    bad = m32.requests - m32.ok + m1.requests - m1.ok + m32.errors + m1.errors
    log(
        f"  round {rnd + 1} {c.key:16s} {m32.rps:8.0f} rps @32  p50@1 {m1.p50_ms:7.3f} ms  "
        f"p99@1 {m1.p99_ms:7.3f} ms  p50@32 {m32.p50_ms:7.2f} ms  {'' if not bad else f'({bad} not ok)'}"
    )


async def interleaved_rounds(live: list[Contender], up: Upstream, p: Params, use_wrk: bool) -> None:
    """``p.rounds`` rounds over every contender, the order rotated and reversed every round so that
    drift on the shared machine spreads over everyone."""
    for rnd in range(p.rounds):
        shift = rnd % len(live)
        order = live[shift:] + live[:shift]
        if rnd % 2:
            order.reverse()
        for c in order:
            await measure(c, up, p, use_wrk, rnd)


def summarise(c: Contender, up: Upstream) -> dict[str, Any]:
    out: dict[str, Any] = {"key": c.key, "label": c.label, "note": c.note}
    if c.unavailable:
        out["unavailable"] = c.unavailable
        return out
    runs = c.runs

    def med(path: tuple[str, str]) -> float:
        return float(median(float(r[path[0]][path[1]]) for r in runs))

    out.update(
        {
            "rps_c32": round(med(("c32", "rps")), 1),
            "p50_c32_ms": round(med(("c32", "p50_ms")), 3),
            "p99_c32_ms": round(med(("c32", "p99_ms")), 3),
            "p50_c1_ms": round(med(("c1", "p50_ms")), 3),
            "p99_c1_ms": round(med(("c1", "p99_ms")), 3),
            "rps_c1": round(med(("c1", "rps")), 1),
            "peak_rss_mb": round(c.peak_kb / 1024, 1),
            "rss_is_upstream": c.proc is None,
            "cpu_pct_c32": median(float(r["cpu_pct_c32"] or 0) for r in runs),
            "not_ok": sum(
                int(r[k]["requests"]) - int(r[k]["ok"]) + int(r[k]["errors"]) for r in runs for k in ("c32", "c1")
            ),
            "rounds": runs,
        }
    )
    return out


async def exact_check(c: Contender, n: int, concurrency: int = 8) -> dict[str, Any]:
    """Exactly ``n`` paid calls that all complete: every successful one must be charged once."""
    gw = c.gateway
    assert gw is not None and gw.config is not None and c.target is not None
    before = await asyncio.to_thread(agentpay.wait_charges_settled, gw.config)
    ok = receipts = 0
    sem = asyncio.Semaphore(concurrency)
    headers = {**loadgen.BASE_HEADERS, **c.target.headers}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one() -> None:
            nonlocal ok, receipts
            async with sem, http.post(c.target.url, data=c.target.body, headers=headers) as resp:  # type: ignore[union-attr]
                body = await resp.read()
            if loadgen.probe_ok(resp.status, body.decode(errors="replace")):
                ok += 1
                receipts += b"io.agentpay/receipt" in body

        await asyncio.gather(*(one() for _ in range(n)))
    after = await asyncio.to_thread(agentpay.wait_charges_settled, gw.config, at_least=before + ok)
    gw.ok_total += ok
    gw.sent_total += n
    return {"calls": n, "ok": ok, "receipts": receipts, "charged": after - before, "exact": after - before == ok}


async def verify_paid(c: Contender, p: Params) -> dict[str, Any]:
    gw = c.gateway
    assert gw is not None and gw.config is not None
    exact = await exact_check(c, p.exact_calls)
    await asyncio.to_thread(agentpay.wait_charges_settled, gw.config)
    charged, millicents = await asyncio.to_thread(agentpay.charged_calls, gw.config)
    verify = await asyncio.to_thread(agentpay.ledger_verify, gw.config)
    result = {
        "ledger_verify_ok": bool(verify.get("ok")) and verify.get("exit_code") == 0,
        "ledger_verify": verify,
        "charged_calls": charged,
        "charged_cents": millicents / 1000,
        "successful_calls": gw.ok_total,
        "requests_sent": gw.sent_total,
        # wrk stops mid-flight: a call cut off at the end of a run may be charged (its answer was written)
        # without wrk counting it, so successful <= charged <= sent; the exact check has no cut-off.
        "consistent": gw.ok_total <= charged <= gw.sent_total and exact["exact"],
        "exact_check": exact,
    }
    log(
        f"  {c.key}: ledger verify {'clean' if result['ledger_verify_ok'] else 'VIOLATIONS'}; "
        f"charged {charged} / successful {gw.ok_total} / sent {gw.sent_total}; exact check: "
        f"{exact['ok']} ok calls, {exact['charged']} charged ({'equal' if exact['exact'] else 'MISMATCH'})"
    )
    return result


async def run_phase(kind: str, p: Params, tools: install.Tools, work: Path, pg_reason: str | None) -> dict[str, Any]:
    use_wrk = tools.wrk is None
    d = work / kind
    up = contenders.aiohttp_upstream(d) if kind == "aiohttp" else contenders.fastmcp_upstream(d, tools)
    result: dict[str, Any] = {"upstream": up.label, "load_generator": "wrk" if use_wrk else "python"}
    if kind == "fastmcp" and tools.fastmcp:
        result["unavailable"] = f"FastMCP not installed: {tools.fastmcp}"
        return result
    log(f"phase {kind}: starting {up.label}")
    up.proc.start()
    pg_urls: list[str] = []
    cs: list[Contender] = []
    try:
        await up.proc.wait_ready(60)
        cs = [contenders.direct(up), contenders.nginx(up, d, tools), contenders.reference(up, d)]
        if kind == "fastmcp":
            cs.append(contenders.fastmcp_proxy(up, d, tools))
        if kind == "fastmcp" or p.litellm_on_aiohttp:
            cs.append(contenders.litellm(up, d, tools))
        cs.append(contenders.agentpay_gateway("agentpay_free", up, d, database="sqlite", paid=False))
        cs.append(contenders.agentpay_gateway("agentpay_sqlite", up, d, database="sqlite", paid=True))
        cs.append(contenders.agentpay_gateway("agentpay_sqlite_grants", up, d, database="sqlite", paid=True))
        pgs = [contenders.agentpay_gateway("agentpay_pg", up, d, database="", paid=True)]
        pgs.append(contenders.agentpay_gateway("agentpay_pg_grants", up, d, database="", paid=True))
        if kind == "aiohttp":  # 1 -> 2 workers (serve --workers 2), on the upstream that shows proxy cost
            cs.append(contenders.agentpay_gateway("agentpay_sqlite_w2", up, d, database="sqlite", paid=True, workers=2))
            pgs.append(contenders.agentpay_gateway("agentpay_pg_w2", up, d, database="", paid=True, workers=2))
        for pg in pgs:
            if pg_reason is None:
                url = await agentpay.create_pg_database()
                pg_urls.append(url)
                assert pg.gateway is not None
                pg.gateway.database = url
            else:
                pg.unavailable = pg_reason
            cs.append(pg)
        for c in cs:
            if not c.unavailable:
                log(f"  starting {c.key}")
                await start_contender(c)
        live = [c for c in cs if not c.unavailable]
        await interleaved_rounds(live, up, p, use_wrk)
        sqlite_paid = next((c for c in live if c.key == "agentpay_sqlite"), None)
        if sqlite_paid is not None and kind == "aiohttp":
            result["profile"] = await profile_paid(sqlite_paid, p, tools, work, use_wrk)
        result["verification"] = {}
        for c in live:
            if c.gateway is not None and c.gateway.paid:
                result["verification"][c.key] = await verify_paid(c, p)
        result["contenders"] = [summarise(c, up) for c in cs]
    finally:
        stop_all([c.proc for c in cs] + [up.proc])
        for url in pg_urls:
            await agentpay.drop_pg_database(url)
    return result


async def profile_paid(c: Contender, p: Params, tools: install.Tools, work: Path, use_wrk: bool) -> dict[str, Any]:
    if tools.pyspy is not None:
        return {"unavailable": f"py-spy: {tools.pyspy}"}
    assert c.proc is not None and c.target is not None and c.gateway is not None
    out = work / "profile.raw"
    log(f"  profiling {c.key} with py-spy for {p.profile_s}s under 32 connections")
    rec = asyncio.create_task(profile.record(tools.pyspy_bin, c.proc.pid, p.profile_s, out))
    await asyncio.sleep(0.5)
    m = await loadgen.run_load(c.target, 32, p.profile_s, use_wrk=use_wrk)
    c.gateway.ok_total += m.ok
    c.gateway.sent_total += m.sent
    error = await rec
    if error:
        return {"unavailable": error}
    summary = profile.summarise(out.read_text())
    summary["rps_while_profiled"] = round(m.rps, 1)
    return summary


# --- ledger, SSE, memory, scale ------------------------------------------------------------------


async def run_ledger(p: Params, work: Path, pg_reason: str | None) -> list[dict[str, Any]]:
    log("ledger micro-benchmark (hold + capture through gateway.ledger; then the credit-grant path)")
    rows: list[dict[str, Any]] = []
    runs = [(db, callers, False) for db in ("sqlite", "postgresql") for callers in p.ledger_callers]
    runs += [(db, 256, True) for db in ("sqlite", "postgresql")]  # issue 19: 1 user, 256 callers
    for db, callers, grants in runs:
        if db == "postgresql" and pg_reason:
            rows.append({"database": db, "callers": callers, "mode": "grants" if grants else "holds",
                         "unavailable": pg_reason})  # fmt: skip
            continue
        if db == "sqlite":
            suffix = "-grants" if grants else ""
            url = f"sqlite:///{work / f'ledger-{callers}{suffix}.db'}"
        else:
            url = await agentpay.create_pg_database()
        try:
            argv = [PY, "-m", "bench.ledger_bench", "--database", url, "--callers", str(callers)]
            argv += ["--grants"] if grants else []
            proc = await asyncio.create_subprocess_exec(
                *argv, "--seconds", str(p.ledger_s), cwd=ROOT, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            row = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            row = {"database": db, "callers": callers, "unavailable": f"failed: {exc}"}
            row["mode"] = "grants" if grants else "holds"
        finally:
            if db == "postgresql":
                await agentpay.drop_pg_database(url)
        rows.append(row)
        log(
            f"  {db:10s} {callers:2d} callers{' (grants)' if grants else ''}: "
            f"{row.get('captures_per_s', 0):8.0f} captures/s  "
            f"capture p50 {row.get('capture_p50_ms', 0)} ms p99 {row.get('capture_p99_ms', 0)} ms"
        )
    return rows


async def run_sse_relay(p: Params, work: Path) -> dict[str, Any]:
    log("SSE relay delay")
    d = work / "sse"
    up = contenders.aiohttp_upstream(d)
    up.proc.start()
    cs: list[Contender] = []
    out: dict[str, Any] = {"ticks_per_call": 20, "interval_ms": 5, "runs": []}
    try:
        await up.proc.wait_ready(60)
        sse_direct = Contender("direct", contenders.LABELS["direct"])
        sse_direct.target = loadgen.Target(up.sse_url, {}, b"")
        ref = contenders.reference(up, d, sse=True)
        paid = contenders.agentpay_gateway("agentpay_sqlite", up, d, database="sqlite", paid=True, sse=True)
        cs = [sse_direct, ref, paid]
        for c in (ref, paid):
            await start_contender(c)
        for concurrency, calls in ((1, p.relay_calls_c1), (16, p.relay_calls_c16)):
            for c in cs:
                if c.unavailable or c.target is None:
                    continue
                r = await sse.relay_delay(
                    c.target.url, c.target.headers, calls=calls, concurrency=concurrency, ticks=20, interval_ms=5
                )
                r["contender"] = c.key
                out["runs"].append(r)
                log(
                    f"  {c.key:16s} {concurrency:2d} streams: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms "
                    f"({r['events']} events, {r['failures']} failures)"
                )
    finally:
        stop_all([c.proc for c in cs] + [up.proc])
    return out


async def run_memory(p: Params, work: Path) -> dict[str, Any]:
    limit = raise_nofile()
    # the gateway holds two sockets per stream (client and upstream) under the same open-file limit
    n = min(p.memory_streams, (limit - 400) // 2)
    log(f"memory run: {n} open SSE streams (asked {p.memory_streams}; open-file limit {limit})")
    d = work / "memory"
    up = contenders.aiohttp_upstream(d)
    up.proc.start()
    out: dict[str, Any] = {"asked": p.memory_streams, "streams": n, "nofile_limit": limit, "runs": []}
    cs: list[Contender] = []
    try:
        await up.proc.wait_ready(60)
        gw = contenders.agentpay_gateway("agentpay_sqlite", up, d, database="sqlite", paid=True)
        assert gw.gateway is not None
        gw.gateway.max_connections = n + 100
        # One key holds every stream: without this its fair share of the upstream connections (issue 8,
        # `max_key_share` 0.5) refuses the second half with 429, as it should for a real key.
        gw.gateway.max_key_share = 1.0
        ref = contenders.reference(up, d)
        cs = [gw, ref]
        for c in cs:
            await start_contender(c)
            if c.unavailable or c.proc is None or c.target is None:
                continue
            r = await sse.hold_streams(c.target.url, c.target.headers, n, c.proc)
            r["contender"] = c.key
            out["runs"].append(r)
            log(
                f"  {c.key:16s} {r['opened']} streams open: RSS {r['rss_before_mb']} -> {r['rss_open_mb']} MB "
                f"({r['kb_per_stream']} KB/stream; {r['failed']} failed)"
            )
            c.proc.stop()
    finally:
        stop_all([c.proc for c in cs] + [up.proc])
    return out


async def run_scale(p: Params, work: Path, pg_reason: str | None, use_wrk: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    d = work / "scale"
    up = contenders.aiohttp_upstream(d)
    up.proc.start()
    pg_urls: list[str] = []
    try:
        await up.proc.wait_ready(60)
        dbs: list[tuple[str, scale.Scale]] = [("sqlite", p.scale_sqlite)]
        if p.scale_pg is not None and pg_reason is None:
            dbs.append(("postgresql", p.scale_pg))
        for db, sc in dbs:
            log(f"scale run ({db}): {sc.postings:,} postings, {sc.keys:,} keys vs an empty ledger")
            pair: list[Contender] = []
            for which in ("empty", "large"):
                c = contenders.agentpay_gateway(
                    "agentpay_sqlite", up, d / f"{db}-{which}", database="sqlite", paid=True
                )
                c.key = f"{db}-{which}"
                assert c.gateway is not None
                if db == "postgresql":
                    url = await agentpay.create_pg_database()
                    pg_urls.append(url)
                    c.gateway.database = url
                pair.append(c)
            large = pair[1]
            assert large.gateway is not None
            await asyncio.to_thread(large.gateway.setup)
            t0 = time.perf_counter()
            if db == "sqlite":
                filled = await asyncio.to_thread(scale.fill_sqlite, str(large.gateway.workdir / "ledger.db"), sc, log)
            else:
                filled = await scale.fill_postgres(large.gateway.database, sc, log)
            fill_s = time.perf_counter() - t0
            large.gateway.setup = lambda: None  # type: ignore[method-assign]  # already set up and filled
            for c in pair:
                await start_contender(c)
            entry: dict[str, Any] = {"database": db, "scale": vars(sc), "filled": filled, "fill_seconds": fill_s}
            if any(c.unavailable for c in pair):
                entry["unavailable"] = "; ".join(str(c.unavailable) for c in pair if c.unavailable)
                out["runs"].append(entry)
                continue
            samples: dict[str, list[dict[str, float]]] = {"empty": [], "large": []}
            for rnd in range(p.scale_rounds):
                order = pair if rnd % 2 == 0 else pair[::-1]
                for c in order:
                    assert c.target is not None
                    await loadgen.run_load(c.target, 1, 1, use_wrk=use_wrk)
                    m1 = await loadgen.run_load(c.target, 1, p.c1_s, use_wrk=use_wrk)
                    m32 = await loadgen.run_load(c.target, 32, p.c32_s, use_wrk=use_wrk)
                    which = c.key.rsplit("-", 1)[1]
                    samples[which].append({"p50_c1_ms": m1.p50_ms, "p99_c1_ms": m1.p99_ms, "rps_c32": m32.rps})
                    log(f"  {c.key:18s} p50@1 {m1.p50_ms:.3f} ms  p99@1 {m1.p99_ms:.3f} ms  {m32.rps:.0f} rps @32")
            for which, rows in samples.items():
                entry[which] = {k: round(median(r[k] for r in rows), 3) for k in rows[0]}
            entry["p50_ratio"] = round(entry["large"]["p50_c1_ms"] / entry["empty"]["p50_c1_ms"], 3)
            entry["rps_ratio"] = round(entry["large"]["rps_c32"] / entry["empty"]["rps_c32"], 3)
            out["runs"].append(entry)
            stop_all([c.proc for c in pair])
            if db == "sqlite":
                shutil.rmtree(d / f"{db}-large", ignore_errors=True)  # gigabytes
    finally:
        up.proc.stop()
        for url in pg_urls:
            await agentpay.drop_pg_database(url)
    return out


# --- main --------------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace) -> int:
    # SIGTERM/SIGINT cancel the run, so every started process is stopped and every database dropped
    # (a background shell starts us with SIGINT ignored: install both explicitly)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if task is not None:
            loop.add_signal_handler(sig, task.cancel)
    p = QUICK if args.quick else FULL
    out_dir = Path(args.out)  # made absolute and created by main()
    work = Path(tempfile.mkdtemp(prefix="agentpay-bench-"))
    started = time.perf_counter()
    raise_nofile()
    log(f"mode {p.name}; work dir {work}; results to {out_dir}")
    tools = install.ensure(out_dir, want_litellm=not args.no_litellm)
    results: dict[str, Any] = {"mode": p.name, "machine": machine(tools), "params": _params_json(p)}
    results["tools"] = {k: v for k, v in vars(tools).items()}
    pg_reason = await agentpay.pg_available()
    only = set(args.only.split(",")) if args.only else None

    async def step(name: str, coro_fn: Any) -> None:
        if only is not None and name not in only:
            return
        try:
            results[name] = await coro_fn()
        except Exception as exc:  # noqa: BLE001 - one failed part must not lose the others
            traceback.print_exc()
            results[name] = {"unavailable": f"{type(exc).__name__}: {exc}"}

    use_wrk = tools.wrk is None
    await step("aiohttp", lambda: run_phase("aiohttp", p, tools, work, pg_reason))
    await step("fastmcp", lambda: run_phase("fastmcp", p, tools, work, pg_reason))
    await step("ledger", lambda: run_ledger(p, work, pg_reason))
    await step("sse_relay", lambda: run_sse_relay(p, work))
    await step("memory", lambda: run_memory(p, work))
    await step("scale", lambda: run_scale(p, work, pg_reason, use_wrk))
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = report.markdown(results)
    (out_dir / "results.md").write_text(text)
    print(text)
    log(f"done in {results['elapsed_s']:.0f}s; wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    if args.keep:
        log(f"kept work dir {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _params_json(p: Params) -> dict[str, Any]:
    out = dict(vars(p))
    out["scale_sqlite"] = vars(p.scale_sqlite)
    out["scale_pg"] = vars(p.scale_pg) if p.scale_pg else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round of everything (< ~3 min)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for results.json/.md")
    parser.add_argument("--no-litellm", action="store_true", help="skip installing and running LiteLLM")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, ledgers)")
    parser.add_argument(
        "--only", help="comma-separated parts to run: aiohttp,fastmcp,ledger,sse_relay,memory,scale (default: all)"
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    sys.exit(asyncio.run(main_async(args)))


if __name__ == "__main__":
    main()
