"""Run the official MCP conformance suite (npm ``@modelcontextprotocol/conformance``) against the
fixture server directly, twice, and then through a real ``agentpay serve`` process with the API key
in the URL path; compare the results check by check.

    python -m tests.conformance.run [--out DIR] [--stdio]

With ``--stdio`` the gateway does not proxy the fixture's HTTP endpoint: it runs the same fixture
as a stdio server itself (``command:``), one child per session, and the results through it are
compared with the direct runs against the HTTP fixture.

Exit status: 0 when no check that passed directly (in both direct runs) failed through the gateway,
the priced calls were charged exactly once each (errors never), and ``agentpay ledger verify`` is
clean; 1 otherwise; 2 when npm could not provide the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from gateway.api.operations import Operations
from gateway.config import load_config
from gateway.ledger import open_ledger
from tests.clients.npm import NodeTools, NpmUnavailable, ensure_installed
from tests.harness import write_config
from tests.process import free_port, run_gateway_process

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SERVER = "conformance"
USER = "conformance-user"
INITIAL_CENTS = "100"
SUITE_TIMEOUT_S = 300

#: Prices for the fixture; every priced item is used exactly once by the suite's scenarios.
PRICES: dict[str, Any] = {
    SERVER: {
        "tools": {
            "test_simple_text": "1",
            "test_image_content": "2",
            "test_tool_with_progress": "1.5",
            "test_sampling": "1",
            "test_elicitation": "1",
            "test_reconnection": "1",
            "test_error_handling": "1",  # always an error result: must never be charged
        },
        "resources": {"test://static-text": "0.5", "test://template/*": "0.25"},
        "prompts": {"test_simple_prompt": "0.25"},
        "default": 0,
    }
}
#: (method, name) -> the scenario whose single successful call must be charged once.
EXPECTED_CHARGES: dict[tuple[str, str], str] = {
    ("tools/call", "test_simple_text"): "tools-call-simple-text",
    ("tools/call", "test_image_content"): "tools-call-image",
    ("tools/call", "test_tool_with_progress"): "tools-call-with-progress",
    ("tools/call", "test_sampling"): "tools-call-sampling",
    ("tools/call", "test_elicitation"): "tools-call-elicitation",
    ("tools/call", "test_reconnection"): "server-sse-polling",
    ("resources/read", "test://static-text"): "resources-read-text",
    ("resources/read", "test://template/123/data"): "resources-templates-read",
    ("prompts/get", "test_simple_prompt"): "prompts-get-simple",
}
NEVER_CHARGED = {("tools/call", "test_error_handling")}

_RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")
_SUMMARY_LINE = re.compile(r"^[✓✗]\s+(?P<scenario>[\w.-]+): (?P<passed>\d+) passed, (?P<failed>\d+) failed")
GRADED = ("SUCCESS", "FAILURE")

CheckKey = tuple[str, str]  # (scenario, check id[#n for repeats])


@dataclass
class SuiteRun:
    label: str
    url: str
    out: Path
    exit_code: int
    seconds: float
    statuses: dict[CheckKey, str] = field(default_factory=dict)  # graded and WARNING checks
    messages: dict[CheckKey, str] = field(default_factory=dict)
    scenarios: list[str] = field(default_factory=list)
    info: set[CheckKey] = field(default_factory=set)  # checks the suite reported as INFO (not graded here)

    def passed(self) -> set[CheckKey]:
        return {k for k, s in self.statuses.items() if s == "SUCCESS"}

    def graded(self) -> set[CheckKey]:
        return {k for k, s in self.statuses.items() if s in GRADED}

    def scenario_passed(self, scenario: str) -> bool:
        return scenario in self.scenarios and all(
            status != "FAILURE" for (name, _), status in self.statuses.items() if name == scenario
        )


def parse_results(run: SuiteRun, stdout: str) -> None:
    """Read every ``server-<scenario>-<timestamp>/checks.json`` the suite wrote under ``run.out``."""
    seen: set[str] = set()
    for path in sorted(run.out.glob("*/checks.json")):
        match = _RESULT_DIR.match(path.parent.name)
        if match is None:
            continue
        scenario = match.group("scenario")
        seen.add(scenario)
        repeats: Counter[str] = Counter()
        for check in json.loads(path.read_text()):
            status = check.get("status")
            cid = str(check.get("id"))
            repeats[cid] += 1
            key = (scenario, cid if repeats[cid] == 1 else f"{cid}#{repeats[cid]}")
            if status not in (*GRADED, "WARNING"):
                if status == "INFO":
                    run.info.add(key)
                continue  # INFO entries are traces, not checks
            run.statuses[key] = status
            if check.get("errorMessage"):
                run.messages[key] = str(check["errorMessage"])
    listed = [m.group("scenario") for m in map(_SUMMARY_LINE.match, stdout.splitlines()) if m]
    for scenario in listed:
        if scenario not in seen:  # the scenario crashed before writing its results
            run.statuses[(scenario, scenario)] = "FAILURE"
            run.messages[(scenario, scenario)] = "no checks.json written"
    run.scenarios = sorted(seen | set(listed))


async def run_suite(tools: NodeTools, label: str, url: str, out: Path, *extra: str) -> SuiteRun:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = tools.npx("@modelcontextprotocol/conformance", "server", "--url", url, "-o", str(out), *extra)
    if not extra:
        argv += ["--suite", "all"]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=tools.root, env=tools.env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(SUITE_TIMEOUT_S):
            stdout, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        stdout, _ = await proc.communicate()
    text = stdout.decode(errors="replace")
    (out / "stdout.txt").write_text(text)
    run = SuiteRun(label, url, out, proc.returncode or 0, time.monotonic() - started)
    parse_results(run, text)
    if not run.scenarios:
        raise RuntimeError(f"the conformance suite ran no scenario ({label}, exit {proc.returncode}):\n{text[-3000:]}")
    return run


async def wait_port(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    async with asyncio.timeout(30):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)  # polling a process we do not control; bounded by the timeout
                continue
            writer.close()
            await writer.wait_closed()
            return


async def start_fixture(log_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    port = free_port()
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.conformance.fixture_server",
            "--port",
            str(port),
            cwd=REPO,
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"},
        )
    await wait_port(port, proc, "the fixture server")
    return proc, port


async def create_account(config_path: Path) -> str:
    """Developer ``acme`` (the server's owner), a user with a balance, and a key for the server."""
    config = load_config(config_path)
    ledger = open_ledger(config.database)
    await ledger.open()
    try:
        ops = Operations(ledger, config)
        await ops.create_developer("acme")
        await ops.create_user(USER, INITIAL_CENTS)
        key = await ops.create_key(user=USER, server=SERVER)
        return str(key["key"])
    finally:
        await ledger.close()


def agentpay(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator CLI, as installed (``agentpay``), else as ``python -m gateway``."""
    script = Path(sys.executable).with_name("agentpay")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]
    return subprocess.run(
        [*argv, "--config", str(config_path), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Report:
    direct: list[SuiteRun]
    gateway: SuiteRun
    retried: SuiteRun | None
    usage: list[dict[str, Any]]
    balance_cents: str
    ledger_ok: bool
    ledger_output: str
    problems: list[str] = field(default_factory=list)

    def classify(self) -> dict[str, set[CheckKey]]:
        d1, d2 = self.direct
        stable_pass = d1.passed() & d2.passed()
        unstable = {k for k in d1.graded() | d2.graded() if d1.statuses.get(k) != d2.statuses.get(k)}
        gateway_pass = self.gateway.passed()
        # A check the suite itself did not grade through the gateway (INFO: e.g. SSE streams are
        # optional when a server answers in JSON, as a stdio server's lone response is) is no regression.
        not_graded_via_gateway = (stable_pass - gateway_pass) & self.gateway.info
        failed_via_gateway = stable_pass - gateway_pass - not_graded_via_gateway
        flaky_via_gateway: set[CheckKey] = set()
        if self.retried is not None:
            flaky_via_gateway = failed_via_gateway & self.retried.passed()
        return {
            "checks": d1.graded() | d2.graded() | self.gateway.graded(),
            "direct_1": d1.passed(),
            "direct_2": d2.passed(),
            "stable_direct": stable_pass,
            "gateway": gateway_pass,
            "regressions": failed_via_gateway - flaky_via_gateway,
            "not_graded_via_gateway": not_graded_via_gateway,
            "flaky_via_gateway": flaky_via_gateway,
            "extra_via_gateway": gateway_pass - (d1.passed() | d2.passed()),
            "failed_direct": (d1.graded() | d2.graded()) - d1.passed() - d2.passed(),
            "unstable_direct": unstable,
        }


def check_billing(report: Report) -> None:
    """Each priced call is charged once per run of its scenario that passed (0 or 1 per run that
    failed), an error result never, and the balance is the initial one less what usage lists."""
    charged: Counter[tuple[str, str]] = Counter()
    total = Decimal(0)
    for row in report.usage:
        charged[(row["method"], row["name"])] += int(row["calls"])
        total += Decimal(row["amount_cents"])
    runs = [report.gateway] + ([report.retried] if report.retried else [])
    for target, scenario in EXPECTED_CHARGES.items():
        ran = [run for run in runs if scenario in run.scenarios]
        passed = [run for run in ran if run.scenario_passed(scenario)]
        if not len(passed) <= charged[target] <= len(ran):
            report.problems.append(
                f"billing: {target[0]} {target[1]} was charged {charged[target]} times; its scenario "
                f"{scenario} ran {len(ran)} times and passed {len(passed)} times"
            )
    for target in NEVER_CHARGED:
        if charged[target]:
            report.problems.append(f"billing: {target[0]} {target[1]} returned an error but was charged")
    for target in charged:
        if target not in EXPECTED_CHARGES:
            report.problems.append(f"billing: unexpected charge for {target[0]} {target[1]}")
    if report.balance_cents == "?" or Decimal(INITIAL_CENTS) - total != Decimal(report.balance_cents):
        report.problems.append(
            f"billing: balance {report.balance_cents}¢ != {INITIAL_CENTS}¢ - charged {total}¢ (usage: {report.usage})"
        )


def fmt_keys(keys: set[CheckKey], runs: list[SuiteRun]) -> list[str]:
    lines = []
    for key in sorted(keys):
        states = "  ".join(f"{r.label}={r.statuses.get(key, '-')}" for r in runs)
        msg = next((r.messages[key] for r in reversed(runs) if key in r.messages), "")
        lines.append(f"    {key[0]} / {key[1]}: {states}" + (f"  ({msg[:200]})" if msg else ""))
    return lines


def print_report(report: Report) -> dict[str, Any]:
    sets = report.classify()
    runs = [*report.direct, report.gateway] + ([report.retried] if report.retried else [])
    rows = [
        ("graded checks (SUCCESS/FAILURE)", len(sets["checks"])),
        ("passed directly, run 1", len(sets["direct_1"])),
        ("passed directly, run 2", len(sets["direct_2"])),
        ("passed through the gateway", len(sets["gateway"])),
        ("regressions (passed directly, failed via gateway)", len(sets["regressions"])),
        ("passed directly, not graded via gateway (INFO)", len(sets["not_graded_via_gateway"])),
        ("failed via gateway once, passed on retry", len(sets["flaky_via_gateway"])),
        ("extra passes through the gateway", len(sets["extra_via_gateway"])),
        ("unstable directly (run 1 != run 2)", len(sets["unstable_direct"])),
        ("failed in both direct runs (fixture gaps)", len(sets["failed_direct"])),
    ]
    width = max(len(name) for name, _ in rows)
    print("\n=== MCP conformance: direct vs through AgentPay ===")
    for name, count in rows:
        print(f"  {name:<{width}}  {count:>4}")
    for title, name in (
        ("regressions", "regressions"),
        ("not graded through the gateway (the suite's INFO)", "not_graded_via_gateway"),
        ("flaky through the gateway", "flaky_via_gateway"),
        ("extra passes through the gateway", "extra_via_gateway"),
        ("unstable directly", "unstable_direct"),
        ("failed in both direct runs", "failed_direct"),
    ):
        if sets[name]:
            print(f"  {title}:")
            print("\n".join(fmt_keys(sets[name], runs)))
    print("\n  per scenario (passed/graded): direct-1 | direct-2 | gateway")
    scenarios = sorted({s for r in runs for s in r.scenarios})
    for scenario in scenarios:
        cells = []
        for run in (*report.direct, report.gateway):
            graded = [k for k in run.graded() if k[0] == scenario]
            passed = [k for k in run.passed() if k[0] == scenario]
            warned = sum(1 for k, s in run.statuses.items() if k[0] == scenario and s == "WARNING")
            cells.append(f"{len(passed)}/{len(graded)}" + (f" ({warned}w)" if warned else ""))
        print(f"    {scenario:<32} " + " | ".join(f"{c:<9}" for c in cells))
    print("\n  billing through the gateway (agentpay usage):")
    for row in sorted(report.usage, key=lambda r: (r["method"], r["name"])):
        print(f"    {row['method']:<15} {row['name']:<28} calls={row['calls']}  amount={row['amount_cents']}¢")
    print(f"    balance: {report.balance_cents}¢ of {INITIAL_CENTS}¢")
    print(f"  agentpay ledger verify: {'clean' if report.ledger_ok else 'VIOLATIONS'}")
    if not report.ledger_ok:
        print(report.ledger_output)
    durations = ", ".join(f"{r.label} {r.seconds:.1f}s" for r in runs)
    print(f"  suite durations: {durations}")
    for problem in report.problems:
        print(f"  PROBLEM: {problem}")
    summary = {
        name: sorted("/".join(k) for k in keys) if name not in ("checks",) else len(keys) for name, keys in sets.items()
    }
    summary["counts"] = {name: count for name, count in rows}
    summary["problems"] = report.problems
    summary["usage"] = report.usage
    summary["balance_cents"] = report.balance_cents
    summary["ledger_ok"] = report.ledger_ok
    return summary


async def run_all(out: Path, *, stdio: bool = False) -> int:
    try:
        tools = await asyncio.to_thread(ensure_installed)
    except NpmUnavailable as exc:
        print(f"conformance: cannot install the npm packages: {exc}", file=sys.stderr)
        return 2
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    fixture, port = await start_fixture(out / "fixture.log")
    try:
        direct_url = f"http://127.0.0.1:{port}/mcp"
        direct = [await run_suite(tools, f"direct-{n}", direct_url, out / f"direct-{n}") for n in (1, 2)]

        gw_dir = out / "gateway-config"
        gw_dir.mkdir()
        if stdio:  # the gateway runs the fixture itself, over stdio
            command = [sys.executable, "-m", "tests.conformance.fixture_server", "--stdio"]
            config_path = write_config(
                gw_dir,
                {SERVER: None},
                prices=PRICES,
                admin_listen=None,
                server_options={SERVER: {"command": command, "cwd": str(REPO)}},
            )
        else:
            config_path = write_config(gw_dir, {SERVER: direct_url}, prices=PRICES, admin_listen=None)
        key = await create_account(config_path)
        async with run_gateway_process(config_path) as gp:
            gw_url = f"http://127.0.0.1:{gp.port}/k/{key}/{SERVER}/mcp"
            through = await run_suite(tools, "gateway", gw_url, out / "gateway")
            (out / "gateway.log").write_text(gp.logs())
            failed = sorted({scenario for scenario, _ in direct[0].passed() & direct[1].passed() - through.passed()})
            retried: SuiteRun | None = None
            if failed:  # once more, those scenarios only, to tell a flaky failure from a consistent one
                retried = SuiteRun("gateway-retry", gw_url, out / "gateway-retry", 0, 0.0)
                for scenario in failed:
                    one = await run_suite(
                        tools, "gateway-retry", gw_url, out / "gateway-retry" / scenario, "--scenario", scenario
                    )
                    retried.statuses.update(one.statuses)
                    retried.messages.update(one.messages)
                    retried.scenarios += one.scenarios
                    retried.seconds += one.seconds
            stopped = await gp.stop()  # SIGTERM drains: every hold is settled before the ledger is read
            (out / "gateway.log").write_text(gp.logs())
        usage_proc = agentpay(config_path, "usage", "--json")
        show_proc = agentpay(config_path, "users", "show", USER, "--json")
        verify_proc = agentpay(config_path, "ledger", "verify", "--json")
        report = Report(
            direct=direct,
            gateway=through,
            retried=retried,
            usage=json.loads(usage_proc.stdout) if usage_proc.returncode == 0 else [],
            balance_cents=json.loads(show_proc.stdout)["balance_cents"] if show_proc.returncode == 0 else "?",
            ledger_ok=verify_proc.returncode == 0,
            ledger_output=verify_proc.stdout + verify_proc.stderr,
        )
        if stopped != 0:
            report.problems.append(f"the gateway exited with {stopped} on SIGTERM")
        if usage_proc.returncode or show_proc.returncode:
            report.problems.append(f"agentpay usage/users show failed: {usage_proc.stderr}{show_proc.stderr}")
        if not report.ledger_ok:
            report.problems.append("agentpay ledger verify reported violations")
        check_billing(report)
    finally:
        if fixture.returncode is None:
            fixture.terminate()
            try:
                async with asyncio.timeout(10):
                    await fixture.wait()
            except TimeoutError:
                fixture.kill()
                await fixture.wait()
    summary = print_report(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"  results: {out}")
    return 1 if summary["regressions"] or report.problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "last", help="where results are written")
    parser.add_argument("--stdio", action="store_true", help="the gateway runs the fixture over stdio")
    args = parser.parse_args()
    sys.exit(asyncio.run(run_all(args.out.resolve(), stdio=args.stdio)))


if __name__ == "__main__":
    main()
