"""The fault-injection soak: many SIGKILL/restart cycles of the gateway under concurrent paid traffic
(mixed with upstream faults, upstream kills mid-stream and client disconnects), then the audit.

    python -m tests.faults.soak --kills 100 --seed 1 [--database sqlite|postgres] [--concurrency 16]

Prints the seed first and the figures last; exits 1 if the audit found a violation.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
from pathlib import Path

from tests.faults.harness import UPSTREAM_FAULTS, Scenario, run_scenario


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100, help="gateway SIGKILL/restart cycles (default 100)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a random seed, printed)")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent client calls")
    parser.add_argument("--upstream-kills", type=int, default=None, help="default: kills // 10")
    parser.add_argument("--fault-share", type=float, default=0.15, help="share of calls with an upstream fault")
    parser.add_argument("--cancel-share", type=float, default=0.05, help="share of clients that disconnect mid-stream")
    parser.add_argument("--min-calls", type=int, default=0)
    parser.add_argument("--credit-grants", action="store_true", help="run the gateway with credit_grants: true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, ledger)")
    return parser


async def soak(args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    scenario = Scenario(
        f"soak-{args.database}",
        min_calls=args.min_calls,
        concurrency=args.concurrency,
        faults={fault: 1.0 for fault in UPSTREAM_FAULTS},
        fault_share=args.fault_share,
        cancel_share=args.cancel_share,
        gateway_kills=args.kills,
        upstream_kills=args.kills // 10 if args.upstream_kills is None else args.upstream_kills,
        database=args.database,
        credit_grants=args.credit_grants,
    )
    workdir = Path(tempfile.mkdtemp(prefix="agentpay-soak-"))
    report = await run_scenario(workdir, scenario, seed)
    if args.keep:
        print(f"work directory: {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if report.violations else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(soak(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
