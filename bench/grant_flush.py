"""Credit grants: how often captured calls are written (``credit_grants_flush_ms``) against what a paid
call costs, side by side with the free call in one run (interleaved rounds, minimal upstream).

    python -m bench.grant_flush [--flush-ms 2,10,25] [--rounds 3] [--no-pg]

Prints, per contender: req/s at 32 connections, p50 at 1 connection, CPU at 32, and the ratios the
issue's targets are stated in (paid ÷ free, paid p50 minus free's). Each paid gateway's ledger is
verified at the end (`agentpay ledger verify`).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
from pathlib import Path
from statistics import median
from tempfile import mkdtemp
from typing import Any

from bench import agentpay, contenders
from bench.contenders import Contender
from bench.procs import stop_all
from bench.run import FULL, Params, interleaved_rounds, start_contender


def _gateway(key: str, label: str, up: contenders.Upstream, d: Path, database: str, extra: dict[str, Any]) -> Contender:
    paid = key != "free"
    gw = agentpay.Gateway(key, d / key, up.url, database, paid, extra=extra)
    return Contender(key, label, gateway=gw)


async def main_async(args: argparse.Namespace) -> int:
    work = Path(mkdtemp(prefix="grant-flush-"))
    use_wrk = shutil.which("wrk") is not None  # else the Python load generator (slower, noisier)
    up = contenders.aiohttp_upstream(work)
    up.proc.start()
    await up.proc.wait_ready(60)
    flushes = [int(x) for x in args.flush_ms.split(",")]
    cs = [_gateway("free", "free call", up, work, "sqlite", {})]
    for ms in flushes:
        extra = {"credit_grants": True, "credit_grants_flush_ms": ms}
        cs.append(_gateway(f"sqlite_{ms}ms", f"paid SQLite, grants, flush {ms} ms", up, work, "sqlite", extra))
    pg_urls: list[str] = []
    if not args.no_pg and await agentpay.pg_available() is None:
        for ms in flushes:
            url = await agentpay.create_pg_database()
            pg_urls.append(url)
            extra = {"credit_grants": True, "credit_grants_flush_ms": ms}
            cs.append(_gateway(f"pg_{ms}ms", f"paid PostgreSQL, grants, flush {ms} ms", up, work, url, extra))
    p = Params(**{**FULL.__dict__, "rounds": args.rounds})
    try:
        for c in cs:
            await start_contender(c)
        live = [c for c in cs if not c.unavailable]
        await interleaved_rounds(live, up, p, use_wrk)
        free = cs[0]
        free_rps = median(r["c32"]["rps"] for r in free.runs)
        free_p50 = median(r["c1"]["p50_ms"] for r in free.runs)
        print(f"\n{'contender':42s} {'req/s@32':>9s} {'÷ free':>7s} {'p50@1 ms':>9s} {'- free':>7s} {'cpu%@32':>8s}")
        for c in live:
            rps = median(r["c32"]["rps"] for r in c.runs)
            p50 = median(r["c1"]["p50_ms"] for r in c.runs)
            cpu = median(float(r["cpu_pct_c32"] or 0) for r in c.runs)
            per_round = " / ".join(
                f"{r['c32']['rps'] / f['c32']['rps']:.2f}" for r, f in zip(c.runs, free.runs, strict=True)
            )
            print(
                f"{c.label:42s} {rps:9.0f} {rps / free_rps:7.2f} {p50:9.3f} {p50 - free_p50:+7.3f} {cpu:8.1f}"
                f"   rounds {per_round}"
            )
        for c in live:
            if c.gateway is not None and c.gateway.paid and c.gateway.config is not None:
                await asyncio.to_thread(agentpay.wait_charges_settled, c.gateway.config)
                verdict = await asyncio.to_thread(agentpay.ledger_verify, c.gateway.config)
                print(f"{c.label}: ledger verify {verdict}")
    finally:
        stop_all([*(c.proc for c in cs), up.proc])
        for url in pg_urls:
            await agentpay.drop_pg_database(url)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flush-ms", default="2,10,25", help="comma-separated credit_grants_flush_ms values")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-pg", action="store_true")
    raise SystemExit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
