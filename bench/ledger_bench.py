"""Ledger micro-benchmark: N concurrent callers doing hold + capture through ``gateway.ledger``
directly (no HTTP), for a fixed time. Reports captures/s and p50/p99 of the hold, the capture and
the pair, then runs ``verify`` on the ledger.

Run: ``python -m bench.ledger_bench --database sqlite:////tmp/l.db --callers 32 --seconds 5``
(prints one JSON document).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from gateway.ids import TimeOrderedIds
from gateway.keys import display_prefix, generate_secret, hash_secret
from gateway.ledger import HoldRequest, open_ledger

PRICE = 1000  # millicents: 1 cent


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


async def run(database: str, callers: int, seconds: float) -> dict[str, Any]:
    ledger = open_ledger(database)
    await ledger.open()
    try:
        await ledger.create_developer("bench-dev")
        await ledger.create_user("bench-user")
        await ledger.topup("bench-user", 10**14)
        secret = generate_secret()
        key = await ledger.create_key(
            user="bench-user",
            server="bench",
            key_hash=hash_secret(secret),
            prefix=display_prefix(secret),
            expires_at=None,
            spend_limit=None,
        )
        holds: list[float] = []
        captures: list[float] = []
        pairs: list[float] = []
        refused = 0
        ids = TimeOrderedIds()

        async def caller(deadline: float) -> None:
            nonlocal refused
            while time.perf_counter() < deadline:
                call_id = ids.next()  # the gateway's own (time-ordered) call ids
                t0 = time.perf_counter()
                outcome = await ledger.hold(
                    HoldRequest(
                        call_id=call_id,
                        key_id=key.id,
                        user="bench-user",
                        developer="bench-dev",
                        server="bench",
                        method="tools/call",
                        name="get_forecast",
                        amount=PRICE,
                        fee=0,
                        lease_s=30.0,
                        owner="ledger-bench",
                    )
                )
                t1 = time.perf_counter()
                if not outcome.ok:
                    refused += 1
                    continue
                await ledger.capture(call_id)
                t2 = time.perf_counter()
                holds.append((t1 - t0) * 1000)
                captures.append((t2 - t1) * 1000)
                pairs.append((t2 - t0) * 1000)

        await asyncio.gather(*(caller(time.perf_counter() + 0.5) for _ in range(callers)))  # warm-up
        for samples in (holds, captures, pairs):
            samples.clear()
        started = time.perf_counter()
        await asyncio.gather(*(caller(started + seconds) for _ in range(callers)))
        elapsed = time.perf_counter() - started
        violations = await ledger.verify()
        return {
            "database": database.split(":", 1)[0],
            "callers": callers,
            "seconds": round(elapsed, 3),
            "captures": len(captures),
            "captures_per_s": round(len(captures) / elapsed, 1),
            "refused": refused,
            "hold_p50_ms": round(pct(holds, 50), 3),
            "hold_p99_ms": round(pct(holds, 99), 3),
            "capture_p50_ms": round(pct(captures, 50), 3),
            "capture_p99_ms": round(pct(captures, 99), 3),
            "pair_p50_ms": round(pct(pairs, 50), 3),
            "pair_p99_ms": round(pct(pairs, 99), 3),
            "verify_ok": not violations,
            "violations": violations[:5],
        }
    finally:
        await ledger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database", required=True)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.database, args.callers, args.seconds))))


if __name__ == "__main__":
    main()
