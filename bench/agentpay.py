"""AgentPay as a contender: config files, the ledger's developer/user/key, the gateway process, a
fresh PostgreSQL database per run, and the correctness check of the paid runs."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.procs import PY, ROOT, Proc, free_port

SERVER = "bench"
DEVELOPER = "bench-dev"
USER = "bench-user"
BALANCE_CENTS = "100000000"  # a million dollars: no run ever comes near it
PRICE_CENTS = "1"
PG_ADMIN_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


def write_config(
    workdir: Path,
    *,
    upstream: str,
    database: str,
    paid: bool,
    port: int,
    max_connections: int = 256,
    max_key_share: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    prices: dict[str, Any] = {SERVER: {"default": 0}}
    if paid:
        prices[SERVER]["tools"] = {"get_forecast": PRICE_CENTS, "*": PRICE_CENTS}
    (workdir / "prices.yaml").write_text(yaml.safe_dump(prices))
    config: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "database": database,
        "prices": "prices.yaml",
        "admin_listen": None,
        "log_format": "json",
        # the benchmark drives one key far beyond the default per-key limits (200/s, 256 in flight)
        "rate_per_key": 0,
        "max_concurrent_per_key": 0,
        "drain_grace_s": 2,  # stopping a gateway between runs need not wait out long streams
        **(extra or {}),
        "servers": {SERVER: {"upstream": upstream, "owner": DEVELOPER, "max_connections": max_connections}},
    }
    if max_key_share is not None:
        config["servers"][SERVER]["max_key_share"] = max_key_share
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(config: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=check,
        timeout=timeout,
    )


def prepare_ledger(config: Path) -> str:
    """Create the developer, a user with a large balance and a key for the bench server; the key."""
    cli(config, "developers", "create", DEVELOPER)
    cli(config, "users", "create", USER, "--balance-cents", BALANCE_CENTS)
    out = cli(config, "keys", "create", "--user", USER, "--server", SERVER, "--json").stdout
    return str(json.loads(out)["key"])


VERIFY_TIMEOUT_S = 240


def _verify_once(config: Path) -> dict[str, Any]:
    proc = cli(config, "ledger", "verify", "--json", check=False, timeout=VERIFY_TIMEOUT_S)
    try:
        data: dict[str, Any] = json.loads(proc.stdout)
    except ValueError:
        data = {"ok": False, "error": (proc.stdout + proc.stderr).strip()[-2000:]}
    data["exit_code"] = proc.returncode
    return data


def ledger_verify(config: Path) -> dict[str, Any]:
    """``agentpay ledger verify`` on the live ledger. On SQLite, when one user has tens of thousands
    of charges, verify's correlated subquery is planned on ``postings_account`` (no statistics):
    quadratic, it runs for many minutes. Then the same verify runs on a consistent backup copy after
    ``ANALYZE`` (statistics steer the plan to ``postings_transfer``), and the result says so."""
    try:
        return _verify_once(config)
    except subprocess.TimeoutExpired:
        pass
    note = f"live verify still running after {VERIFY_TIMEOUT_S}s (quadratic plan, see bench/README.md)"
    cfg = yaml.safe_load(config.read_text())
    database = str(cfg["database"])
    if not database.startswith("sqlite:///"):
        return {"ok": False, "exit_code": None, "error": note}
    live = Path(database.removeprefix("sqlite:///"))
    copy_dir = config.parent / "verify-copy"
    copy_dir.mkdir(exist_ok=True)
    copy = copy_dir / "ledger.db"
    copy.unlink(missing_ok=True)
    src, dst = sqlite3.connect(live), sqlite3.connect(copy)
    try:
        src.backup(dst)  # one consistent snapshot of the live ledger
        dst.execute("ANALYZE")
        dst.commit()
    finally:
        src.close()
        dst.close()
    (copy_dir / "prices.yaml").write_text((config.parent / "prices.yaml").read_text())
    cfg["database"] = f"sqlite:///{copy}"
    (copy_dir / "gateway.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    data = _verify_once(copy_dir / "gateway.yaml")
    data["note"] = note + "; verified a backup copy after ANALYZE"
    return data


def wait_charges_settled(config: Path, *, at_least: int = 0, stable_s: float = 2.0, limit_s: float = 120) -> int:
    """Captures commit after the answer is written (asynchronously): wait until the charge count
    reaches ``at_least`` and stops moving, then return it."""
    deadline = time.monotonic() + limit_s
    last, since = -1, time.monotonic()
    while True:
        count, _ = charged_calls(config)
        now = time.monotonic()
        if count != last:
            last, since = count, now
        elif count >= at_least and now - since >= stable_s:
            return count
        if now > deadline:
            return count
        time.sleep(0.5)


def charged_calls(config: Path) -> tuple[int, int]:
    """(number of charges, millicents charged) for the bench user, from ``agentpay usage``."""
    rows = json.loads(cli(config, "usage", "--user", USER, "--json").stdout)
    calls = sum(int(r.get("calls", 0)) for r in rows)
    cents = sum(float(r.get("amount_cents", 0)) for r in rows)
    return calls, round(cents * 1000)


async def create_pg_database() -> str:
    """A fresh database for one run; returns its URL. Dropped by ``drop_pg_database``."""
    import asyncpg

    name = f"agentpay_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}"


async def drop_pg_database(url: str) -> None:
    import asyncpg

    name = url.rsplit("/", 1)[1]
    if not name.startswith("agentpay_bench_"):
        raise ValueError(f"refusing to drop {name!r}: not a bench database")
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it does not."""
    try:
        import asyncpg

        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        await conn.close()
    except Exception as exc:  # noqa: BLE001 - any failure makes the contender unavailable, with its reason
        return f"PostgreSQL at {PG_ADMIN_DSN} unavailable: {type(exc).__name__}: {exc}"
    return None


@dataclass
class Gateway:
    """One AgentPay gateway process with its own config and ledger."""

    name: str
    workdir: Path
    upstream: str
    database: str  # a URL, or "sqlite" for a file in workdir
    paid: bool
    workers: int = 1  # serve --workers N
    max_connections: int = 256
    max_key_share: float | None = None  # None: the gateway's default (0.5: one key, half the connections)
    extra: dict[str, Any] = field(default_factory=dict)
    port: int = 0
    key: str = ""
    config: Path | None = None
    proc: Proc | None = None
    ok_total: int = 0  # successful calls counted by the load generator
    sent_total: int = 0  # requests written by the load generator (some cut off at the end of a run)

    def setup(self) -> None:
        self.port = free_port()
        database = f"sqlite:///{self.workdir / 'ledger.db'}" if self.database == "sqlite" else self.database
        self.config = write_config(
            self.workdir,
            upstream=self.upstream,
            database=database,
            paid=self.paid,
            port=self.port,
            max_connections=self.max_connections,
            max_key_share=self.max_key_share,
            extra=self.extra,
        )
        self.key = prepare_ledger(self.config)

    def process(self) -> Proc:
        assert self.config is not None
        self.proc = Proc(
            self.name,
            [PY, "-m", "gateway", "--config", str(self.config), "serve", "--workers", str(self.workers)],
            self.port,
            self.workdir / "gateway.log",
        )
        return self.proc

    async def start(self) -> Proc:
        proc = self.process().start()
        await proc.wait_ready(60, "/readyz")
        return proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{SERVER}/mcp"


async def settle_quiet(seconds: float = 0.5) -> None:
    """Give settlement tasks of the last requests a moment to commit before reading the ledger."""
    await asyncio.sleep(seconds)
