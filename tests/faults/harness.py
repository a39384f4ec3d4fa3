"""Fault-injection harness: the real gateway (``python -m gateway … serve``) as an OS process in
front of the audited upstream (``tests.faults.audited_upstream``, another OS process), concurrent
paid calls with unique nonces, faults drawn from a seeded RNG, restarts of what was killed, and an
audit of the ledger against what the upstream completed and what the clients saw.

Replay: every call's shape and fault is a function of ``(seed, call index)`` and every injector's
schedule a function of ``(seed, injector)``; the seed is printed first. Timing (which call is in
flight when a kill lands) still depends on the machine, so a replay reruns the same schedule.
Environment: ``FAULT_SEED`` fixes the tests' seed; ``FAULT_KEEP=1`` keeps the PostgreSQL schema;
``AGENTPAY_TEST_PG`` is the PostgreSQL DSN (default ``postgresql://postgres@127.0.0.1:5432/test``).

The audit (``FaultRun.audit``):
  (a) every captured charge is for a nonce the upstream logged as completed with a success
      (charges map to nonces through the hold's name: the tool is ``job_<nonce>``);
  (b) no nonce is charged twice;
  (c) ``agentpay ledger verify`` is clean;
  (d) no hold stays pending longer than its lease + one sweep interval (+ scheduling slack) while a
      gateway is up, and none is pending once the run settles;
  (e) money is conserved: users + developers + platform fee == total top-ups (world == -top-ups).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import yaml

from gateway.api.operations import Operations
from gateway.ledger import open_ledger
from gateway.money import format_cents, parse_cents
from tests.harness import prepare_ledger, write_config
from tests.process import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
PRICE = parse_cents("5")
FEE_PERCENT = "10"
TOOL_PREFIX = "job_"
PG_DSN = os.environ.get("AGENTPAY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
UPSTREAM_FAULTS = (
    "delay",
    "timeout",
    "reset",
    "5xx",
    "garbage",
    "truncate_json",
    "truncate_sse",
    "end_sse",
    "slow_body",
    "slow_body_timeout",
    "rpc_error",
    "tool_error",
)


CHARGEABLE_FAULTS = (None, "delay", "slow_body")  # faults after which the upstream still answers in time


def say(text: str) -> None:
    print(text, flush=True)


# --- what the run does ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    hold_lease_s: float = 1.5
    sweep_interval_s: float = 0.25
    read_timeout_s: float = 1.0  # upstream headers / JSON body; "timeout" faults exceed it
    slack_s: float = 1.0  # scheduling jitter allowed on top of lease + sweep interval
    call_timeout_s: float = 15.0  # client side


@dataclass
class Scenario:
    name: str
    min_calls: int = 60
    concurrency: int = 12
    sse_share: float = 0.5
    stream_events: tuple[int, int] = (0, 3)  # SSE progress events before the answer
    gap_s: tuple[float, float] = (0.0, 0.05)
    faults: dict[str, float] = field(default_factory=dict)  # fault -> weight; the rest are clean calls
    fault_share: float = 0.0
    cancel_share: float = 0.0  # clients that disconnect mid-stream
    gateway_kills: int = 0
    upstream_kills: int = 0
    sqlite_locks: tuple[float, ...] = ()  # how long each lock is held
    disk_full: bool = False
    pg_terminations: int = 0
    database: str = "sqlite"  # "sqlite" | "postgres"
    users: int = 3
    balance_cents: int = 1_000_000
    timing: Timing = field(default_factory=Timing)
    credit_grants: bool = False  # paid calls held and captured in memory against grants (issue 19)


@dataclass(frozen=True)
class CallSpec:
    index: int
    nonce: str
    user: int
    answer: str  # "json" | "sse"
    fault: str | None
    args: dict[str, Any]
    cancel_after: float | None  # seconds after the first streamed event


def make_spec(seed: int, index: int, sc: Scenario) -> CallSpec:
    rng = random.Random(f"{seed}/call/{index}")
    nonce = f"n{index:06d}x{rng.getrandbits(32):08x}"
    answer = "sse" if rng.random() < sc.sse_share else "json"
    fault: str | None = None
    names = sorted(sc.faults)
    if rng.random() < sc.fault_share and names:
        fault = rng.choices(names, weights=[sc.faults[n] for n in names])[0]
    if index < len(names):  # the first calls cover every fault once
        fault = names[index]
    t = sc.timing
    args: dict[str, Any] = {"nonce": nonce, "answer": answer}
    if answer == "sse":
        args["events"] = rng.randint(*sc.stream_events)
        args["gap_s"] = round(rng.uniform(*sc.gap_s), 3)
    if fault in ("truncate_sse", "end_sse"):
        answer = args["answer"] = "sse"
        args.setdefault("events", 1)
        args.setdefault("gap_s", 0.01)
    if fault in ("truncate_json", "slow_body", "slow_body_timeout", "timeout"):
        answer = args["answer"] = "json"
        args.pop("events", None)
        args.pop("gap_s", None)
    wire = fault
    if fault == "delay":
        args["delay_s"] = round(rng.uniform(0.05, t.read_timeout_s * 0.5), 3)
    elif fault == "timeout":
        wire, args["delay_s"] = "delay", round(t.read_timeout_s + rng.uniform(0.3, 0.8), 3)
    elif fault == "5xx":
        args["status"] = rng.choice([500, 502, 503])
    elif fault == "slow_body":
        args["chunks"], args["gap_s"] = rng.randint(2, 4), round(t.read_timeout_s * 0.1, 3)
    elif fault == "slow_body_timeout":
        wire, args["chunks"], args["gap_s"] = "slow_body", 3, round(t.read_timeout_s * 0.8, 3)
    if wire is not None:
        args["fault"] = wire
    cancel = None
    if answer == "sse" and fault is None and sc.cancel_share and rng.random() < sc.cancel_share:
        args["events"] = max(2, args.get("events", 0))
        args["gap_s"] = max(0.05, args.get("gap_s", 0.0))
        cancel = round(rng.uniform(0.0, args["events"] * args["gap_s"] * 1.5), 3)
    return CallSpec(index, nonce, rng.randrange(sc.users), answer, fault, args, cancel)


@dataclass
class CallRecord:
    spec: CallSpec
    started: float = 0.0
    status: int | None = None
    outcome: str = "pending"  # success | refused | tool_error | rpc_error | http_<n> | error:<exc> | ...
    charge_id: str | None = None  # from the receipt the client saw
    receipt_amount: str | None = None
    cancelled: bool = False
    first_event: asyncio.Event = field(default_factory=asyncio.Event)
    gateway_epoch: int = 0

    @property
    def success(self) -> bool:
        return self.outcome == "success"


# --- processes -----------------------------------------------------------------------------------


class UpstreamProcess:
    """The audited upstream; restarted on the same port after a kill."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "upstream-audit.log"
        self.port = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.kills = 0
        self._stderr = (workdir / "upstream.stderr").open("ab")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.faults.audited_upstream",
            "--port",
            str(self.port),
            "--log",
            str(self.log_path),
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._stderr,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(30):
            line = await self.proc.stdout.readline()
        if not line.startswith(b"LISTENING "):
            raise RuntimeError(f"audited upstream did not start: {line!r}")
        self.port = int(line.split()[1])

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        self.kills += 1

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            async with asyncio.timeout(10):
                await self.proc.wait()
        self._stderr.close()

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))  # a line cut by SIGKILL is skipped
        return out


class GatewayProcess:
    """``python -m gateway --config … serve``; its log (stderr) is copied to a file, and readiness
    is the ``gateway_ready`` log line (an event, no polling)."""

    def __init__(self, config_path: Path, port: int) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = config_path.parent / "gateway.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.epoch = 0
        self.kills = 0
        self.unexpected_exits: list[int] = []
        self.up: list[list[float]] = []  # [ready_at, down_at] per incarnation (down_at inf while up)
        self._reader: asyncio.Task[None] | None = None
        self._killing = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/weather/mcp"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(self.config_path),
            "serve",
            cwd=REPO_ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        started = asyncio.Event()
        self._reader = asyncio.create_task(self._read(self.proc, started))
        async with asyncio.timeout(60):
            await started.wait()
        if self.proc.returncode is not None or not self.ready.is_set():
            raise RuntimeError(f"gateway did not start (exit {self.proc.returncode}):\n{self.log_tail()}")

    async def _read(self, proc: asyncio.subprocess.Process, started: asyncio.Event) -> None:
        assert proc.stdout is not None
        with self.log_path.open("ab") as log:
            log.write(f"--- gateway incarnation {self.epoch + 1} pid {proc.pid}\n".encode())
            while line := await proc.stdout.readline():
                log.write(line)
                if not started.is_set() and b"gateway_ready" in line:
                    self.epoch += 1
                    self.up.append([time.time(), float("inf")])
                    self.ready.set()
                    started.set()
            log.flush()
        code = await proc.wait()
        if self.ready.is_set():
            self.up[-1][1] = time.time()
        self.ready.clear()
        started.set()
        if not self._killing:
            self.unexpected_exits.append(code)

    async def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None and self._reader is not None
        self._killing = True
        self.ready.clear()  # clients wait for the next incarnation
        if self.up and self.up[-1][1] == float("inf"):
            self.up[-1][1] = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        async with asyncio.timeout(60):
            await self._reader
        self._killing = False
        if sig == signal.SIGKILL:
            self.kills += 1

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill(signal.SIGTERM)

    def log_events(self) -> Counter[str]:
        """Warnings and errors in the gateway's log, by event (``unhandled`` for tracebacks; a
        ``ledger locked`` suffix when the message says the ledger stayed locked)."""
        events: Counter[str] = Counter()
        if not self.log_path.exists():
            return events
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("level") in ("warning", "error"):
                    locked = " (ledger locked)" if "stayed locked" in str(entry.get("error", "")) else ""
                    events[str(entry.get("event")) + locked] += 1
                elif entry.get("error") == "unavailable":
                    events["request refused: unavailable"] += 1
            elif line.startswith(("ERROR ", "Error handling request")):
                events["unhandled: " + line[:60]] += 1
        return events

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


# --- ledger access -------------------------------------------------------------------------------


@dataclass
class HoldRow:
    call_id: str
    name: str
    state: str
    created_at: float
    lease_expires_at: float
    settled_at: float | None
    charge_id: str | None
    amount: int


class LedgerProbe:
    """Raw reads of the ledger tables (holds, accounts, top-ups) for the audit."""

    def __init__(self, database: str) -> None:
        self.database = database

    async def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if self.database.startswith("sqlite:///"):
            path = self.database[len("sqlite:///") :]

            def read() -> list[tuple[Any, ...]]:
                conn = sqlite3.connect(path, timeout=30)
                try:
                    return [tuple(r) for r in conn.execute(sql).fetchall()]
                finally:
                    conn.close()

            return await asyncio.to_thread(read)
        conn = await asyncpg.connect(self.database)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    async def holds(self) -> list[HoldRow]:
        rows = await self._rows(
            "SELECT call_id, name, state, created_at, lease_expires_at, settled_at, charge_id, amount FROM holds"
        )
        return [
            HoldRow(
                call_id=str(r[0]),
                name=str(r[1]),
                state=str(r[2]),
                created_at=float(r[3]),
                lease_expires_at=float(r[4]),
                settled_at=None if r[5] is None else float(r[5]),
                charge_id=r[6],
                amount=int(r[7]),
            )
            for r in rows
        ]

    async def pending(self) -> list[HoldRow]:
        return [h for h in await self.holds() if h.state == "pending"]

    async def balances(self) -> dict[str, int]:
        rows = await self._rows("SELECT kind, SUM(balance), SUM(held) FROM accounts GROUP BY kind")
        out: dict[str, int] = {}
        for kind, balance, held in rows:
            out[str(kind)] = int(balance)
            out[f"{kind}_held"] = int(held)
        return out

    async def topups(self) -> int:
        rows = await self._rows("SELECT COALESCE(SUM(amount), 0) FROM transfers WHERE kind = 'topup'")
        return int(rows[0][0])


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    scenario: str
    seed: int
    elapsed_s: float = 0.0
    calls: int = 0
    successes_seen: int = 0
    charged: int = 0
    unbilled_successes: int = 0
    receipts_without_charge: int = 0
    charged_unseen: int = 0  # charged, but the client saw no success (it was cancelled or cut off)
    double_charges: int = 0
    money_created: int = 0  # millicents; negative = destroyed
    stranded_holds: int = 0
    time_to_void_s: float = 0.0
    max_void_lateness_s: float = 0.0  # after the lease lapsed
    max_void_delay_s: float = 0.0  # after the lease lapsed with a gateway up and the ledger writable
    swept_holds: int = 0
    gateway_kills: int = 0
    upstream_kills: int = 0
    sqlite_locks: int = 0
    disk_full_windows: int = 0
    pg_terminations: int = 0
    charges_in_upstream_kill_window: int = 0
    verify: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    by_fault: Counter[tuple[str, str]] = field(default_factory=Counter)  # (fault, client outcome)
    charged_by_fault: Counter[str] = field(default_factory=Counter)
    log_events: Counter[str] = field(default_factory=Counter)  # the gateway's warnings and errors
    notes: list[str] = field(default_factory=list)

    def figures(self) -> str:
        lines = [
            f"scenario {self.scenario}  seed {self.seed}  elapsed {self.elapsed_s:.1f}s",
            f"  unbilled share         {self.unbilled_successes / max(self.successes_seen, 1):.2%} of successes seen",
            f"  kills survived         gateway {self.gateway_kills}, upstream {self.upstream_kills}",
            f"  other faults           sqlite locks {self.sqlite_locks}, disk-full windows {self.disk_full_windows}, "
            f"pg connections terminated {self.pg_terminations}",
            f"  calls                  {self.calls}",
            f"  successes seen         {self.successes_seen}",
            f"  charged                {self.charged}",
            f"  unbilled successes     {self.unbilled_successes}  (receipts whose capture never committed: "
            f"{self.receipts_without_charge})",
            f"  charged, client cut off {self.charged_unseen}",
            f"  double charges         {self.double_charges}",
            f"  money created/destroyed {format_cents(self.money_created)} cents",
            f"  stranded holds         {self.stranded_holds}",
            f"  time to void           {self.time_to_void_s:.2f}s after traffic stopped; "
            f"{self.swept_holds} holds voided after their lease lapsed, at most {self.max_void_lateness_s:.2f}s "
            f"later ({self.max_void_delay_s:.2f}s counting only time with a gateway up and the ledger writable)",
            f"  ledger verify          {'clean' if not self.verify else self.verify}",
            f"  upstream faults        {dict(sorted(self.faults.items()))}",
            f"  charged by fault       {dict(sorted(self.charged_by_fault.items()))}",
            f"  client outcomes        {dict(sorted(self.outcomes.items()))}",
            f"  gateway warnings/errors {dict(sorted(self.log_events.items()))}",
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  VIOLATION: {v}" for v in self.violations]
        return "\n".join(lines)


class FaultRun:
    def __init__(self, workdir: Path, scenario: Scenario, seed: int) -> None:
        self.workdir = workdir
        self.sc = scenario
        self.seed = seed
        self.report = Report(scenario.name, seed)
        self.records: list[CallRecord] = []
        self.upstream = UpstreamProcess(workdir)
        self.gateway: GatewayProcess | None = None
        self.database = ""
        self.keys: list[str] = []
        self.config_path = workdir / "gateway.yaml"
        self._next = 0
        self._stop = False
        self._done = 0
        self._progress = asyncio.Event()
        self._streaming: set[int] = set()
        self._stream_event = asyncio.Event()
        self.ledger_dir = workdir
        self.pg_schema: str | None = None
        self.outages: list[tuple[float, float]] = []  # the ledger could not be written (locked, disk full)

    # set-up ------------------------------------------------------------------------------------
    async def setup(self) -> None:
        say(f"fault seed: {self.seed} (scenario {self.sc.name}; replay with seed={self.seed})")
        await self.upstream.start()
        t = self.sc.timing
        if self.sc.database == "postgres":
            self.pg_schema = f"faults_{uuid.uuid4().hex[:12]}"
            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f"CREATE SCHEMA {self.pg_schema}")
            finally:
                await conn.close()
            database = f"{PG_DSN}?search_path={self.pg_schema}"
        else:
            database = f"sqlite:///{self.ledger_dir / 'ledger.db'}"
        port = free_port()
        write_config(
            self.workdir,
            {"weather": self.upstream.url},
            prices={"weather": {"tools": {"*": format_cents(PRICE)}, "default": 0}},
            database=database,
            listen=f"127.0.0.1:{port}",
            admin_listen=None,
            log_format="json",
            hold_lease_s=t.hold_lease_s,
            sweep_interval_s=t.sweep_interval_s,
            drain_grace_s=2,
            max_concurrent_per_key=1024,
            credit_grants=self.sc.credit_grants,
            server_options={"weather": {"read_timeout_s": t.read_timeout_s, "platform_fee_percent": FEE_PERCENT}},
        )
        self.database = yaml.safe_load(self.config_path.read_text())["database"]
        if self.database.startswith("sqlite:///") and not Path(self.database[10:]).is_absolute():
            self.database = f"sqlite:///{self.workdir / self.database[10:]}"
        await prepare_ledger(self.config_path)
        ledger = open_ledger(self.database)
        await ledger.open()
        try:
            ops = Operations(ledger)
            for i in range(self.sc.users):
                await ops.create_user(f"user{i}", str(self.sc.balance_cents))
                self.keys.append(str((await ops.create_key(user=f"user{i}", server="weather"))["key"]))
        finally:
            await ledger.close()
        self.gateway = GatewayProcess(self.config_path, port)
        await self.gateway.start()

    async def teardown(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        await self.upstream.stop()
        if self.pg_schema is not None and not os.environ.get("FAULT_KEEP"):
            conn = await asyncpg.connect(PG_DSN)
            try:
                await conn.execute(f"DROP SCHEMA {self.pg_schema} CASCADE")
            finally:
                await conn.close()

    # traffic -----------------------------------------------------------------------------------
    def _mark_done(self) -> None:
        self._done += 1
        self._progress.set()
        self._progress = asyncio.Event()

    async def wait_calls(self, count: int) -> None:
        """Wait until ``count`` more calls have finished."""
        target = self._done + count
        while self._done < target:
            await self._progress.wait()

    async def wait_streaming(self, count: int) -> None:
        """Wait until at least ``count`` SSE calls are mid-stream (first event seen, not finished)."""
        while len(self._streaming) < count:
            await self._stream_event.wait()

    def _stream_changed(self) -> None:
        self._stream_event.set()
        self._stream_event = asyncio.Event()

    async def _call(self, http: aiohttp.ClientSession, rec: CallRecord) -> None:
        assert self.gateway is not None
        spec = rec.spec
        body = {
            "jsonrpc": "2.0",
            "id": spec.index,
            "method": "tools/call",
            "params": {"name": TOOL_PREFIX + spec.nonce, "arguments": spec.args},
        }
        headers = {**HEADERS, "Authorization": f"Bearer {self.keys[spec.user]}"}
        rec.started = time.time()
        rec.gateway_epoch = self.gateway.epoch
        try:
            async with http.post(self.gateway.url, json=body, headers=headers) as resp:
                rec.status = resp.status
                if resp.status != 200:
                    rec.outcome = f"http_{resp.status}"
                    await resp.read()
                    return
                if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    await self._read_sse(resp, rec)
                else:
                    self._classify(rec, json.loads(await resp.read()))
        except asyncio.CancelledError:
            rec.cancelled = True
            if rec.outcome == "pending":
                rec.outcome = "cancelled"
            raise
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as exc:
            if rec.outcome == "pending":
                rec.outcome = f"error:{type(exc).__name__}"
        finally:
            self._streaming.discard(spec.index)
            self._stream_changed()

    async def _read_sse(self, resp: aiohttp.ClientResponse, rec: CallRecord) -> None:
        data: list[str] = []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
                continue
            if line or not data:
                continue
            if not rec.first_event.is_set():
                rec.first_event.set()
                self._streaming.add(rec.spec.index)
                self._stream_changed()
            try:
                value = json.loads("\n".join(data))
            except ValueError:
                value = None
            data = []
            if isinstance(value, dict) and value.get("id") == rec.spec.index:
                self._classify(rec, value)
        if rec.outcome == "pending":
            rec.outcome = "stream_ended_without_answer"

    def _classify(self, rec: CallRecord, value: Any) -> None:
        if isinstance(value, list):
            value = next((v for v in value if isinstance(v, dict) and v.get("id") == rec.spec.index), None)
        if not isinstance(value, dict):
            rec.outcome = "bad_body"
            return
        if "error" in value:
            rec.outcome = f"rpc_error:{value['error'].get('code')}"
            return
        result = value.get("result")
        if not isinstance(result, dict):
            rec.outcome = "bad_body"
            return
        meta = result.get("_meta") or {}
        if result.get("isError"):
            rec.outcome = "refused" if "io.agentpay/payment_required" in meta else "tool_error"
            return
        receipt = meta.get("io.agentpay/receipt")
        text = " ".join(str(c.get("text")) for c in result.get("content", []) if isinstance(c, dict))
        if rec.spec.nonce not in text:
            rec.outcome = "wrong_answer"
            self.report.violations.append(f"call {rec.spec.nonce} got another call's answer: {text!r}")
            return
        if not isinstance(receipt, dict):
            rec.outcome = "success_without_receipt"
            return
        rec.outcome = "success"
        rec.charge_id = receipt.get("charge_id")
        rec.receipt_amount = receipt.get("amount_cents")

    async def _worker(self, http: aiohttp.ClientSession) -> None:
        assert self.gateway is not None
        while not self._stop:
            index = self._next
            self._next += 1
            rec = CallRecord(make_spec(self.seed, index, self.sc))
            self.records.append(rec)
            if not self.gateway.ready.is_set():
                async with asyncio.timeout(120):
                    await self.gateway.ready.wait()
            task = asyncio.create_task(self._call(http, rec))
            if rec.spec.cancel_after is not None:
                first = asyncio.create_task(rec.first_event.wait())
                await asyncio.wait({task, first}, return_when=asyncio.FIRST_COMPLETED)
                first.cancel()
                if not task.done():
                    await asyncio.sleep(rec.spec.cancel_after)  # the fault: disconnect this long into the stream
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._mark_done()
            if rec.outcome.startswith("error:") and not self.gateway.ready.is_set():
                continue  # the gateway is down: the next call waits for it

    async def drive(self, injectors: list[Callable[[], Awaitable[None]]]) -> None:
        """Run traffic until every injector has finished and at least ``min_calls`` calls were made."""
        timeout = aiohttp.ClientTimeout(total=self.sc.timing.call_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.sc.concurrency * 2)
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            workers = [asyncio.create_task(self._worker(http)) for _ in range(self.sc.concurrency)]
            try:
                for injector in injectors:
                    await injector()
                while self._done < self.sc.min_calls:
                    await self._progress.wait()
            finally:
                self._stop = True
                await asyncio.gather(*workers)
        self.report.elapsed_s = time.monotonic() - started

    # injectors ---------------------------------------------------------------------------------
    def _rng(self, what: str) -> random.Random:
        return random.Random(f"{self.seed}/{what}")

    async def kill_gateway_cycles(self, cycles: int, *, progress: bool = False) -> None:
        assert self.gateway is not None
        rng = self._rng("gateway-kills")
        for cycle in range(cycles):
            await self.wait_calls(rng.randint(2, 10))
            await asyncio.sleep(rng.uniform(0, 0.6))  # the fault: a random instant while calls are in flight
            await self.gateway.kill(signal.SIGKILL)
            await self.gateway.start()
            if progress and (cycle + 1) % 10 == 0:
                say(f"  {cycle + 1} gateway kill/restart cycles, {self._done} calls")
        self.report.gateway_kills = self.gateway.kills

    async def kill_upstream_mid_stream(self, times: int) -> None:
        rng = self._rng("upstream-kills")
        for _ in range(times):
            await self.wait_calls(rng.randint(1, 5))
            async with asyncio.timeout(60):
                await self.wait_streaming(rng.randint(1, 3))
            await self.upstream.kill()
            await self.upstream.start()
        self.report.upstream_kills = self.upstream.kills

    async def lock_sqlite(self, holds: tuple[float, ...]) -> None:
        """Another process takes the ledger's write lock (``BEGIN EXCLUSIVE``) for a while."""
        path = self.database[len("sqlite:///") :]
        script = (
            "import sqlite3, sys\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n"
            "c.execute('BEGIN EXCLUSIVE')\n"
            "print('LOCKED', flush=True)\n"
            "sys.stdin.readline()\n"
            "c.execute('ROLLBACK')\n"
        )
        rng = self._rng("sqlite-locks")
        for hold_s in holds:
            await self.wait_calls(rng.randint(3, 10))
            locker = await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
            assert locker.stdout is not None and locker.stdin is not None
            async with asyncio.timeout(30):
                assert await locker.stdout.readline() == b"LOCKED\n"
            locked_at = time.time()
            await asyncio.sleep(hold_s)  # the fault's duration
            locker.stdin.write(b"release\n")
            await locker.stdin.drain()
            async with asyncio.timeout(30):
                assert await locker.wait() == 0
            self.outages.append((locked_at, time.time()))
            self.report.sqlite_locks += 1

    async def fill_disk(self, fs_dir: Path | None, *, restart_after: bool, min_full_s: float = 0.0) -> None:
        """Fill the filesystem holding the ledger (``fs_dir``, a small tmpfs) until writes fail, keep
        it full until calls have failed on it, then free it (and optionally restart the gateway).
        Without a small filesystem (``None``: mounting needs root), the gateway process gets a file
        size limit (``RLIMIT_FSIZE`` at the ledger files' current sizes; Python ignores SIGXFSZ, so
        writes past it fail with EFBIG) instead."""
        assert self.gateway is not None and self.gateway.proc is not None
        rng = self._rng("disk-full")
        await self.wait_calls(rng.randint(5, 15))
        before = Counter(r.outcome for r in self.records)
        full_at = time.time()
        pid = self.gateway.proc.pid
        filler = fs_dir / "filler" if fs_dir is not None else None
        if filler is not None:
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for size in (1 << 16, 4096, 512, 1):
                    with contextlib.suppress(OSError):
                        while True:
                            os.write(fd, b"\0" * size)
            finally:
                os.close(fd)
        else:
            db = Path(self.database[len("sqlite:///") :])
            sizes = [p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists()]
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (max(sizes), resource.RLIM_INFINITY))
        self.report.disk_full_windows += 1
        if min_full_s:
            await asyncio.sleep(min_full_s)  # the fault's duration
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # keep it full until writes have failed for a while
            failed = sum(
                n
                for o, n in Counter(r.outcome for r in self.records).items()
                if o.startswith("http_5") and n > before.get(o, 0)
            )
            if failed >= 5:
                break
            await self.wait_calls(1)
        else:
            self.report.notes.append("disk full: no call failed on the full disk within 10s")
        if filler is not None:
            filler.unlink()
        else:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        self.outages.append((full_at, time.time()))
        if restart_after:
            assert self.gateway is not None
            await self.gateway.kill(signal.SIGKILL)
            await self.gateway.start()

    async def terminate_pg(self, times: int) -> None:
        """``pg_terminate_backend`` on the gateway's ledger connections while calls are in flight."""
        assert self.gateway is not None and self.gateway.proc is not None
        rng = self._rng("pg-terminate")
        conn = await asyncpg.connect(PG_DSN)
        try:
            for _ in range(times):
                await self.wait_calls(rng.randint(2, 8))
                rows = await self._terminate_when_busy(conn, self.gateway.proc.pid)
                self.report.pg_terminations += sum(1 for r in rows if r[2])
                self.report.notes.append(
                    "pg backends terminated in states: " + ", ".join(sorted(str(r[1]) for r in rows))
                )
        finally:
            await conn.close()

    @staticmethod
    async def _terminate_when_busy(conn: asyncpg.Connection, pid: int, looks: int = 2000) -> list[asyncpg.Record]:
        """Terminate the gateway's backends at the first look (one statement: one snapshot of
        ``pg_stat_activity``) that finds one of them running a statement or inside a transaction, so
        the fault lands mid-transaction rather than whenever the pool happened to be idle; after
        ``looks`` looks (each a round trip), whatever state they are in."""
        rows: list[asyncpg.Record] = []
        for look in range(looks):
            ports = sorted(tcp_client_ports(pid, 5432))
            rows = await conn.fetch(
                "SELECT pid, state, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE client_port = ANY($1::int[]) AND pid <> pg_backend_pid() AND ($2 OR EXISTS ("
                "  SELECT 1 FROM pg_stat_activity b WHERE b.client_port = ANY($1::int[]) "
                "  AND b.state IN ('active', 'idle in transaction')))",
                ports,
                look == looks - 1,
            )
            if rows:
                return rows
        return rows

    # audit -------------------------------------------------------------------------------------
    async def settle(self) -> None:
        """With the gateway up, wait until no hold is pending (bounded by lease + sweep + slack)."""
        t = self.sc.timing
        probe = LedgerProbe(self.database)
        started = time.time()
        pending = await probe.pending()
        deadline = max([h.lease_expires_at for h in pending], default=started) + t.sweep_interval_s + t.slack_s
        while pending and time.time() < deadline:
            await asyncio.sleep(t.sweep_interval_s / 2)  # the gateway is another process: poll, bounded
            pending = await probe.pending()
        self.report.time_to_void_s = time.time() - started
        if pending:
            self.report.violations.append(
                f"{len(pending)} holds still pending {time.time() - max(h.lease_expires_at for h in pending):.1f}s "
                f"after their lease expired: {[h.call_id for h in pending[:5]]}"
            )

    def _void_due(self, lease_expiry: float) -> float:
        """When the sweeper must have voided a hold whose lease lapsed at ``lease_expiry``: one
        sweep interval (+ slack) after the lease lapsed while a gateway was up."""
        assert self.gateway is not None
        t = self.sc.timing
        need = t.sweep_interval_s + t.slack_s
        for up, down in self.gateway.up:
            start = max(up, lease_expiry)
            for o_start, o_end in sorted(self.outages):
                if o_end <= start or o_start >= start + need:
                    continue
                start = max(start, o_end)  # the ledger could not be written: the clock restarts after
            if down - start >= need:
                return start + need
        return float("inf")

    async def verify_cli(self) -> list[str]:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "--config", str(self.config_path), "ledger", "verify", "--json"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if result.returncode != 0:
            return [f"ledger verify exited {result.returncode}: {result.stdout.strip()} {result.stderr.strip()}"]
        out = json.loads(result.stdout)
        return [] if out.get("ok") else list(out.get("violations", ["not ok"]))

    async def audit(self) -> Report:
        rep = self.report
        assert self.gateway is not None
        await self.settle()
        probe = LedgerProbe(self.database)
        holds = await probe.holds()
        by_call = {h.call_id: h for h in holds}
        completed: set[str] = set()
        sending: set[str] = set()
        for line in self.upstream.records():
            if line.get("outcome") != "ok":
                continue
            if line.get("phase") == "completed":
                completed.add(line["nonce"])
            elif line.get("phase") == "sending":
                sending.add(line["nonce"])
        records = {r.spec.nonce: r for r in self.records}
        rep.calls = len(self.records)
        rep.successes_seen = sum(r.success for r in self.records)
        rep.faults = Counter(r.spec.fault or "none" for r in self.records)
        rep.outcomes = Counter(r.outcome for r in self.records)
        rep.by_fault = Counter((r.spec.fault or "none", r.outcome) for r in self.records)

        # charges, through the ledger interface, mapped to nonces through their holds
        ledger = open_ledger(self.database)
        await ledger.open()
        try:
            charges = []
            before: str | None = None
            while True:
                page = await ledger.list_charges(limit=500, before=before)
                charges += page
                if len(page) < 500:
                    break
                before = page[-1].id
        finally:
            await ledger.close()
        rep.charged = len(charges)
        per_nonce: Counter[str] = Counter()
        charge_ids = {c.id for c in charges}
        for charge in charges:
            hold = by_call.get(charge.call_id)
            if hold is None or hold.state != "captured" or hold.charge_id != charge.id:
                rep.violations.append(f"charge {charge.id} has no captured hold")
                continue
            if charge.amount != PRICE:
                rep.violations.append(f"charge {charge.id} is {charge.amount} millicents, not {PRICE}")
            nonce = charge.name.removeprefix(TOOL_PREFIX)
            per_nonce[nonce] += 1
            rec = records.get(nonce)
            if nonce in completed:
                pass
            elif nonce in sending and rep.upstream_kills:
                rep.charges_in_upstream_kill_window += 1  # killed between its last write and its log line
            else:
                rep.violations.append(f"charge {charge.id} for nonce {nonce} the upstream never completed")
            if rec is None:
                rep.violations.append(f"charge {charge.id} for unknown nonce {nonce}")
                continue
            rep.charged_by_fault[rec.spec.fault or "none"] += 1
            if rec.spec.fault not in CHARGEABLE_FAULTS:
                rep.violations.append(f"charge {charge.id} for a call with upstream fault {rec.spec.fault}")
            if not rec.success:
                rep.charged_unseen += 1
                definite_failure = rec.outcome.startswith(("http_", "rpc_error", "tool_error", "refused", "bad_body"))
                if definite_failure:
                    rep.violations.append(f"charge {charge.id}: the client was answered {rec.outcome}")
            elif rec.charge_id != charge.id:
                rep.violations.append(f"charge {charge.id}: the client's receipt names {rec.charge_id}")
        rep.double_charges = sum(n - 1 for n in per_nonce.values() if n > 1)
        if rep.double_charges:
            rep.violations.append(f"{rep.double_charges} double charges: {[n for n, c in per_nonce.items() if c > 1]}")
        rep.unbilled_successes = len(completed - set(per_nonce))
        rep.receipts_without_charge = sum(1 for r in self.records if r.success and r.charge_id not in charge_ids)
        for rec in self.records:
            if rec.outcome == "success_without_receipt":
                rep.violations.append(f"call {rec.spec.nonce}: a priced success without a receipt")
            if rec.success and rec.receipt_amount != format_cents(PRICE):
                rep.violations.append(f"call {rec.spec.nonce}: receipt amount {rec.receipt_amount}")

        # (d) holds voided after their lease: how late, and whether any was stranded
        now = time.time()
        for hold in holds:
            if hold.state == "captured":
                continue
            end = hold.settled_at if hold.settled_at is not None else now
            if end <= hold.lease_expires_at:
                continue
            rep.swept_holds += 1
            rep.max_void_lateness_s = max(rep.max_void_lateness_s, end - hold.lease_expires_at)
            due = self._void_due(hold.lease_expires_at)
            need = self.sc.timing.sweep_interval_s + self.sc.timing.slack_s
            rep.max_void_delay_s = max(rep.max_void_delay_s, end - (due - need))
            if end > due or hold.state == "pending":
                rep.stranded_holds += 1
        if rep.stranded_holds:
            rep.violations.append(f"{rep.stranded_holds} holds outlived their lease + one sweep interval")

        # (c) ledger verify, (e) conservation
        rep.verify = await self.verify_cli()
        if rep.verify:
            rep.violations.append(f"ledger verify: {rep.verify}")
        balances = await probe.balances()
        topups = await probe.topups()
        expected = self.sc.users * parse_cents(str(self.sc.balance_cents))
        if topups != expected:
            rep.violations.append(f"top-ups total {topups}, expected {expected}")
        inside = balances.get("user", 0) + balances.get("developer", 0) + balances.get("platform_fee", 0)
        inside += balances.get("payout_clearing", 0)
        rep.money_created = inside - topups
        if rep.money_created:
            rep.violations.append(f"money created/destroyed: {rep.money_created} millicents")
        if balances.get("world", 0) != -topups:
            rep.violations.append(f"world balance {balances.get('world')} != -top-ups {-topups}")
        if balances.get("user_held", 0):
            rep.violations.append(f"users still have {balances['user_held']} millicents held")
        if rep.charged * PRICE != balances.get("developer", 0) + balances.get("platform_fee", 0):
            rep.violations.append("developer earnings + platform fee != charges")
        rep.log_events = self.gateway.log_events()
        if self.gateway.unexpected_exits:
            rep.violations.append(f"the gateway exited on its own: {self.gateway.unexpected_exits}")
        return rep


def tcp_client_ports(pid: int, remote_port: int) -> set[int]:
    """Local ports of ``pid``'s TCP connections to ``remote_port`` (from /proc)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # the process was just killed (a fault of its own in this run)
        return set()
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                local, remote, inode = parts[1], parts[2], parts[9]
                if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


# --- filesystems for the disk-full fault ---------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(base: Path, size: str = "4m") -> Any:
    """A size-limited tmpfs mounted under ``base`` (root only). Yields its path, or None when
    mounting is not permitted."""
    mount_dir = base / "smallfs"
    mount_dir.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_dir)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        mount_dir.rmdir()
        yield None
        return
    try:
        yield mount_dir
    finally:
        subprocess.run(["umount", "-l", str(mount_dir)], capture_output=True, check=False)
        shutil.rmtree(mount_dir, ignore_errors=True)


async def run_scenario(
    workdir: Path,
    scenario: Scenario,
    seed: int,
    injectors: Callable[[FaultRun], list[Callable[[], Awaitable[None]]]] | None = None,
    *,
    ledger_dir: Path | None = None,
) -> Report:
    """Set up, drive traffic under the scenario's faults, audit, tear down; print the figures."""
    run = FaultRun(workdir, scenario, seed)
    if ledger_dir is not None:
        run.ledger_dir = ledger_dir
    try:
        await run.setup()
        chosen = injectors(run) if injectors is not None else default_injectors(run)
        await run.drive(chosen)
        report = await run.audit()
    except BaseException:
        if run.gateway is not None:
            say(f"gateway log tail (seed {seed}):\n{run.gateway.log_tail()}")
        raise
    finally:
        await run.teardown()
    say(report.figures())
    return report


def default_injectors(run: FaultRun) -> list[Callable[[], Awaitable[None]]]:
    """The scenario's injectors, all running at once (a gateway kill may land while the upstream
    is restarting or the ledger is locked)."""
    sc = run.sc
    each: list[Callable[[], Awaitable[None]]] = []
    if sc.gateway_kills:
        each.append(lambda: run.kill_gateway_cycles(sc.gateway_kills, progress=sc.gateway_kills >= 20))
    if sc.upstream_kills:
        each.append(lambda: run.kill_upstream_mid_stream(sc.upstream_kills))
    if sc.sqlite_locks:
        each.append(lambda: run.lock_sqlite(sc.sqlite_locks))
    if sc.pg_terminations:
        each.append(lambda: run.terminate_pg(sc.pg_terminations))

    async def together() -> None:
        await asyncio.gather(*(injector() for injector in each))

    return [together]


def seed_from_env() -> int:
    text = os.environ.get("FAULT_SEED")
    return int(text) if text else random.SystemRandom().randrange(2**32)
