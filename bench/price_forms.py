"""What each price form costs on the hot path (issue 18), one run.

Two parts:

- ``pricing``: the CPU cost of pricing one call (``PriceTable.price_of`` and, for a rule, its quote
  of the request's arguments), per form, in nanoseconds (best of 5 rounds of ``timeit``).
- ``proxy``: sequential ``tools/call`` requests through a whole in-process gateway (aiohttp, SQLite
  ledger in a temporary directory, the demo upstream on loopback), one form per tool: p50 and mean
  latency per call, then ``ledger verify``. The free-allowance form writes its claim and its
  settlement instead of a hold and a capture.

Run: ``python -m bench.price_forms [--calls 300]`` (prints one JSON document).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp.test_utils import TestServer
from gateway.api.operations import Operations
from gateway.app import create_app
from gateway.billing.pricing import parse_prices
from gateway.billing.rules import PriceRule, parse_report
from gateway.config import load_config
from gateway.ledger import open_ledger
from gateway.ops.demo_upstream import DemoUpstream
from gateway.runtime import RUNTIME

PRICES: dict[str, Any] = {
    "bench": {
        "tools": {
            "get_forecast": 1,
            "premium_report": {"price": 1, "by_argument": [{"when": {"city": "Oslo"}, "price": 2}]},
            "add": {"price": 1, "per_unit": {"argument": "a", "price": "0.5", "max_units": 1000}},
            "translate": {"metered": True, "max": 50, "price": 5},
            "echo": {"price": 1, "free_calls_per_day": 1_000_000_000},
        }
    }
}
FORMS: dict[str, tuple[str, dict[str, Any]]] = {  # form -> (tool, arguments)
    "flat": ("get_forecast", {"city": "Oslo"}),
    "by_argument": ("premium_report", {"city": "Oslo"}),
    "per_unit": ("add", {"a": 7, "b": 1}),
    "metered": ("translate", {"text": "hello"}),
    "free_allowance": ("echo", {"message": "hi"}),
}


def pricing_ns() -> dict[str, float]:
    table = parse_prices(yaml.safe_dump(PRICES), source="bench", servers=["bench"])
    out: dict[str, float] = {}
    for form, (tool, arguments) in FORMS.items():

        def price_one(tool: str = tool, arguments: dict[str, Any] = arguments) -> object:
            price = table.price_of("bench", "tool", tool)
            return price.quote(arguments) if isinstance(price, PriceRule) else price

        n = 200_000
        best = min(timeit.repeat(price_one, number=n, repeat=5))
        out[form] = round(best / n * 1e9, 1)
    result = {"content": [], "_meta": {"io.agentpay/charge": {"amount_cents": "12.5"}}}
    n = 200_000
    out["metered_report_read"] = round(
        min(timeit.repeat(lambda: parse_report(result), number=n, repeat=5)) / n * 1e9, 1
    )
    return out


async def proxy_ms(calls: int) -> dict[str, Any]:
    upstream = DemoUpstream()
    up = TestServer(upstream.app(), host="127.0.0.1", port=None)
    await up.start_server()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "prices.yaml").write_text(yaml.safe_dump(PRICES))
        config_path = root / "gateway.yaml"
        config_path.write_text(
            yaml.safe_dump(
                {
                    "listen": "127.0.0.1:8080",
                    "database": f"sqlite:///{root / 'ledger.db'}",
                    "prices": "prices.yaml",
                    "servers": {"bench": {"owner": "acme", "upstream": str(up.make_url("/mcp"))}},
                }
            )
        )
        config = load_config(config_path)
        ledger = open_ledger(config.database)
        await ledger.open()
        try:
            await ledger.create_developer("acme")  # the owner must exist before the gateway starts
        finally:
            await ledger.close()
        gateway = TestServer(create_app(config), host="127.0.0.1", port=None)
        await gateway.start_server()
        try:
            rt = gateway.app[RUNTIME]
            ops = Operations(rt.ledger, rt.config)
            await ops.create_user("bench-user", "1000000")
            key = str((await ops.create_key(user="bench-user", server="bench"))["key"])
            headers = {
                "Authorization": f"Bearer {key}",
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json",
            }
            url = str(gateway.make_url("/bench/mcp"))
            out: dict[str, Any] = {}
            async with aiohttp.ClientSession() as http:

                async def call(tool: str, arguments: dict[str, Any], rid: int) -> float:
                    body = {
                        "jsonrpc": "2.0",
                        "id": rid,
                        "method": "tools/call",
                        "params": {"name": tool, "arguments": arguments},
                    }
                    t0 = time.perf_counter()
                    async with http.post(url, json=body, headers=headers) as resp:
                        answer = await resp.json(content_type=None)
                    elapsed = (time.perf_counter() - t0) * 1000
                    assert "result" in answer and not answer["result"].get("isError"), answer
                    return elapsed

                rid = 0
                for tool, arguments in FORMS.values():  # warm-up, every form
                    for _ in range(30):
                        rid += 1
                        await call(tool, arguments, rid)
                samples: dict[str, list[float]] = {form: [] for form in FORMS}
                for _ in range(calls):  # the forms interleaved, so each sees the same machine load
                    for form, (tool, arguments) in FORMS.items():
                        rid += 1
                        samples[form].append(await call(tool, arguments, rid))
                for form, taken in samples.items():
                    ordered = sorted(taken)
                    out[form] = {
                        "p50_ms": round(ordered[len(ordered) // 2], 3),
                        "mean_ms": round(statistics.fmean(taken), 3),
                    }
            await rt.billing.wait_settled()
            out["verify_ok"] = await rt.ledger.verify() == []
            return out
        finally:
            await gateway.close()
            await up.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="calls per form through the proxy")
    args = parser.parse_args()
    report = {
        "load_average": os.getloadavg(),
        "pricing_ns_per_call": pricing_ns(),
        "proxy_sequential": asyncio.run(proxy_ms(args.calls)),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
