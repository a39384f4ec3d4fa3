"""Ledger micro-benchmark: N concurrent callers doing hold + capture through ``gateway.ledger``
directly (no HTTP), for a fixed time. Reports captures/s and p50/p99 of the hold, the capture and
the pair, then runs ``verify`` on the ledger.

Run: ``python -m bench.ledger_bench --database sqlite:////tmp/l.db --callers 32 --seconds 5``
(prints one JSON document).

``--grants``: the credit-grant path instead (``gateway.billing.grants``, issue 19): the callers hold
and capture through ``Billing`` with grants on (in memory, out of one grant of the one user's key)
and the captures are written in batches by the flusher. captures/s counts captures *written* to the
ledger (the run ends when the last batch has committed); the hold figures are the in-memory hold.

``--grants --no-write``: the same callers, but each flush is answered as if it had committed without
writing a row (``_UnwrittenFlushes``): the ceiling of the in-memory path itself (``Billing``, the
grant book, call ids, the callers' own loop), what the grant path would do with a ledger that cost
nothing. captures/s then counts captures the flusher handed to the (absent) writer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from gateway.billing.grants import GrantPolicy
from gateway.billing.settlement import Billing
from gateway.ids import TimeOrderedIds
from gateway.keys import display_prefix, generate_secret, hash_secret
from gateway.ledger import HoldRequest, open_ledger
from gateway.ledger.grants import GrantedCall, GrantFlush, GrantState, GrantStatus
from gateway.ledger.interfaces import Ledger

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


class _UnwrittenFlushes:
    """A ledger whose ``flush_grant`` answers as if the batch had committed, writing nothing (the
    grant stays open, the balance plenty); every other call (grants, top-ups of them) goes to ``ledger``."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self.handed = 0  # calls flushed (not written)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    async def flush_grant(self, grant_id: str, calls: list[GrantedCall], *, release: int | None = 0) -> GrantFlush:
        self.handed += len(calls)
        state = GrantState(GrantStatus.OK, amount=10**12, available=10**13, spend_remaining=None)
        return GrantFlush(state, captured=len(calls), replayed=0)


async def run_grants(database: str, callers: int, seconds: float, *, write: bool = True) -> dict[str, Any]:
    """Captures/s through the credit-grant path: 1 user, 1 key, ``callers`` concurrent callers.
    ``write=False``: flushes are answered without writing (the in-memory path's ceiling)."""
    real = open_ledger(database)
    await real.open()
    unwritten = None if write else _UnwrittenFlushes(real)
    ledger: Any = real if unwritten is None else unwritten
    billing = Billing(ledger, owner="ledger-bench", lease_s=30.0, sweep_interval_s=5.0, grants=GrantPolicy())
    assert billing.grants is not None
    maintain = asyncio.get_running_loop().create_task(billing.renew_forever())
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
        refused = 0
        calls = 0

        async def caller(deadline: float) -> None:
            nonlocal refused, calls
            while time.perf_counter() < deadline:
                call_id = billing.new_call_id()
                t0 = time.perf_counter()
                outcome = await billing.hold(
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
                else:
                    billing.settle(call_id, capture=True)  # queued; the flusher writes it
                    holds.append((t1 - t0) * 1000)
                    calls += 1
                await asyncio.sleep(0)  # an in-memory hold does not yield: let the other callers run

        await asyncio.gather(*(caller(time.perf_counter() + 0.5) for _ in range(callers)))  # warm-up
        await billing.wait_settled()
        holds.clear()
        calls = 0
        flushes = billing.grants.flushes
        before = len(await ledger.list_charges(limit=10**7)) if unwritten is None else unwritten.handed
        started = time.perf_counter()
        await asyncio.gather(*(caller(started + seconds) for _ in range(callers)))
        issued = time.perf_counter() - started
        await billing.wait_settled()  # the last batch committed (and fsynced on SQLite)
        elapsed = time.perf_counter() - started
        after = len(await ledger.list_charges(limit=10**7)) if unwritten is None else unwritten.handed
        written = after - before
        batches = billing.grants.flushes - flushes
        await billing.close()
        violations = await real.verify() if unwritten is None else []
        return {
            "database": database.split(":", 1)[0],
            "mode": "grants" if unwritten is None else "grants, flushes not written",
            "callers": callers,
            "seconds": round(elapsed, 3),
            "captures": written,
            "captures_per_s": round(written / elapsed, 1),
            "held_per_s": round(calls / issued, 1),
            "refused": refused,
            "unbilled": billing.grants.unbilled,
            "flushes": batches,
            "calls_per_flush": round(written / max(batches, 1), 1),
            "hold_p50_ms": round(pct(holds, 50), 4),
            "hold_p99_ms": round(pct(holds, 99), 4),
            "verify_ok": not violations and written == calls,
            "violations": violations[:5] or ([] if written == calls else [f"{calls} captured, {written} written"]),
        }
    finally:
        maintain.cancel()
        await real.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database", required=True)
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--grants", action="store_true", help="the credit-grant path (hold/capture in memory)")
    parser.add_argument(
        "--no-write", action="store_true", help="with --grants: answer flushes without writing (the ceiling)"
    )
    args = parser.parse_args()
    if args.no_write and not args.grants:
        parser.error("--no-write measures the grant path: add --grants")
    if args.grants:
        result = asyncio.run(run_grants(args.database, args.callers, args.seconds, write=not args.no_write))
    else:
        result = asyncio.run(run(args.database, args.callers, args.seconds))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
