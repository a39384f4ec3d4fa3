"""Three `agentpay serve` processes on one PostgreSQL schema behave as one gateway.

One upstream (the fault upstream, in this process), three gateway replicas (real OS processes,
each on its own port, sharing the database, the session secret and the price file). Checked:

* concurrent paid calls through all three against a small balance B at price p: exactly
  floor(B/p) charged, every receipt's charge unique and in the ledger, every charge a delivered
  success, `ledger verify` clean;
* a key revoked through one replica's CLI stops working on every replica within 1 s;
* a price-table change (the shared file edited) reaches every replica (the digest on each replica's
  admin listener's `/metrics`);
* a session opened through one replica works through the others;
* one replica SIGKILLed mid-load with holds in flight: its stranded holds are voided by the
  survivors' sweepers once their lease lapses, long calls on the survivors keep their holds
  (they outlast the lease), and again exactly floor(B/p) charged, no double charge, verify clean.

The figures (calls, charged, expected, wall time) are printed: run with `-s` to see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml

from gateway.api.operations import Operations
from gateway.config import load_config
from gateway.ledger.base import AccountKind
from gateway.ledger.postgres import PostgresLedger
from gateway.money import format_cents, parse_cents
from gateway.proxy import RECEIPT_META
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, prepare_ledger, rpc, tool_call, write_config
from tests.ledger.conftest import StoreSpec
from tests.process import GatewayProcess, free_port, run_gateway_process

pytestmark = pytest.mark.timeout(240)

REPO = Path(__file__).resolve().parents[1]
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
REPLICAS = 3
PRICE = parse_cents("5")  # FAULT_PRICES: every tool but echo costs 5 cents
LEASE_S = 1.2  # hold lease; renewed every LEASE_S / 3 by the owning replica
SWEEP_S = 0.3
SLOW_S = 2.0  # the slow tool outlasts the lease: only renewals keep its hold alive
SECRET = "replica-test-session-secret-0123456789"
ADMIN_TOKEN = "replica-test-admin-token-0123456789"


@dataclass
class Result:
    replica: int
    status: int | None  # None: the connection failed (the replica died)
    body: Any = None
    started: float = 0.0

    @property
    def charge_id(self) -> str | None:
        if not isinstance(self.body, dict):
            return None
        receipt = ((self.body.get("result") or {}).get("_meta") or {}).get(RECEIPT_META)
        return None if receipt is None else str(receipt["charge_id"])

    @property
    def refused_for_funds(self) -> bool:
        return "insufficient" in json.dumps(self.body).lower()


@dataclass
class Cluster:
    gateways: list[GatewayProcess]
    configs: list[Path]
    prices: Path
    ledger: PostgresLedger
    spec: StoreSpec
    http: aiohttp.ClientSession
    admin_ports: list[int]  # each replica's admin listener (/metrics)
    dead: set[int] = field(default_factory=set)

    def url(self, i: int) -> str:
        return self.gateways[i].url("weather")

    def alive(self) -> list[int]:
        return [i for i in range(len(self.gateways)) if i not in self.dead]

    async def post(self, i: int, key: str, body: Any, session: str | None = None) -> Result:
        headers = {**HEADERS, "Authorization": f"Bearer {key}"}
        if session is not None:
            headers["Mcp-Session-Id"] = session
        started = time.time()
        try:
            async with self.http.post(self.url(i), json=body, headers=headers) as resp:
                raw = await resp.read()
                try:
                    parsed: Any = json.loads(raw) if raw else None
                except ValueError:
                    parsed = raw.decode(errors="replace")
                return Result(i, resp.status, parsed, started)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError):
            return Result(i, None, None, started)

    async def new_user(self, name: str, cents: str) -> tuple[str, str]:
        """(secret, key id) of a fresh user's key for 'weather'."""
        ops = Operations(self.ledger, load_config(self.configs[0]))
        await ops.create_user(name, cents)
        key = await ops.create_key(user=name, server="weather")
        return str(key["key"]), str(key["id"])

    async def digest(self, i: int) -> str:
        async with self.http.get(
            f"http://127.0.0.1:{self.admin_ports[i]}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as resp:
            text = await resp.text()
        found = re.findall(r'^agentpay_price_table_info\{digest="([^"]+)"\} 1\.0$', text, re.MULTILINE)
        assert len(found) == 1, text
        return str(found[0])

    async def charges(self, user: str) -> list[str]:
        return [c.id for c in await self.ledger.list_charges(user=user, limit=10_000)]

    async def connect(self) -> asyncpg.Connection:
        """A raw connection to the replicas' schema, for what the Ledger interface does not show."""
        return await asyncpg.connect(self.spec.location, server_settings={"search_path": f'"{self.spec.schema}"'})

    async def pending(self, user: str, owner_pid: int | None = None) -> list[str]:
        conn = await self.connect()
        try:
            rows = await conn.fetch(
                "SELECT h.call_id FROM holds h JOIN accounts a ON a.id = h.user_account_id "
                "WHERE a.name = $1 AND h.state = 'pending' AND ($2::text IS NULL OR h.owner LIKE $2) ORDER BY 1",
                user,
                None if owner_pid is None else f"%:{owner_pid}:%",
            )
            return [str(r[0]) for r in rows]
        finally:
            await conn.close()

    async def owners(self, call_ids: list[str]) -> dict[str, str]:
        conn = await self.connect()
        try:
            rows = await conn.fetch("SELECT call_id, owner FROM holds WHERE call_id = ANY($1::text[])", call_ids)
            return {str(r[0]): str(r[1]) for r in rows}
        finally:
            await conn.close()


async def poll_until(check: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.02) -> None:
    """Poll state that lives in other processes (the database) until ``check`` holds."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(interval)


async def _at_least(rows: Awaitable[list[str]], n: int, *, at_most: bool = False) -> bool:
    count = len(await rows)
    return count <= n if at_most else count >= n


@asynccontextmanager
async def cluster(tmp_path: Path, upstream_url: str, *, grants: bool = False) -> AsyncIterator[Cluster]:
    spec = StoreSpec.fresh("postgres", tmp_path)  # fails (never skips) when PostgreSQL is down
    database = f"{spec.location}?schema={spec.schema}"
    shared = tmp_path / "shared"
    shared.mkdir()
    prices = shared / "prices.yaml"
    prices.write_text(yaml.safe_dump(FAULT_PRICES))
    configs = []
    admin_ports = [free_port() for _ in range(REPLICAS)]
    for i in range(REPLICAS):
        directory = tmp_path / f"replica-{i}"
        directory.mkdir()
        configs.append(
            write_config(
                directory,
                {"weather": upstream_url},
                FAULT_PRICES,
                database=database,
                session_secret=SECRET,
                hold_lease_s=LEASE_S,
                sweep_interval_s=SWEEP_S,
                key_cache_s=1.0,
                admin_listen=f"127.0.0.1:{admin_ports[i]}",
                admin_token=ADMIN_TOKEN,
                rate_per_key=0,
                max_concurrent_per_key=0,
                credit_grants=grants,
            )
        )
        config = yaml.safe_load(configs[-1].read_text())
        config["prices"] = str(prices)  # every replica watches the one shared (mounted) file
        configs[-1].write_text(yaml.safe_dump(config, sort_keys=False))
    await prepare_ledger(configs[0])
    ledger = PostgresLedger(spec.location, schema=spec.schema, max_size=5)
    await ledger.open()
    try:
        async with AsyncExitStack() as stack:
            gateways = list(await asyncio.gather(*(stack.enter_async_context(run_gateway_process(c)) for c in configs)))
            connector = aiohttp.TCPConnector(limit=200)
            http = await stack.enter_async_context(
                aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))
            )
            yield Cluster(gateways, configs, prices, ledger, spec, http, admin_ports)
    finally:
        await ledger.close()
        await spec.drop()


async def _fire_burst(c: Cluster, key: str, calls: int) -> list[Result]:
    return list(
        await asyncio.gather(
            *(c.post(i % REPLICAS, key, tool_call("get_forecast", {"city": f"c{i}"}, i)) for i in range(calls))
        )
    )


async def check_burst(c: Cluster, upstream_completed: list[str]) -> dict[str, Any]:
    """300 concurrent calls, 100 per replica, against a balance of 103 cents at 5 cents a call."""
    balance, calls = parse_cents("103"), 300
    expected = balance // PRICE
    key, _ = await c.new_user("alice", format_cents(balance))
    before = upstream_completed.count("get_forecast")
    started = time.monotonic()
    results = await _fire_burst(c, key, calls)
    wall = time.monotonic() - started

    receipts = [r.charge_id for r in results if r.charge_id is not None]
    assert all(r.status is not None for r in results), "a live replica dropped a connection"
    assert len(receipts) == len(set(receipts)), "a charge id appeared on two receipts"
    unpaid = [r for r in results if r.charge_id is None]
    assert all(r.refused_for_funds for r in unpaid), Counter(json.dumps(r.body)[:120] for r in unpaid)
    # a receipt goes out with the response; the capture commits right after it
    await poll_until(lambda: _at_least(c.pending("alice"), 0, at_most=True), within=10)
    charges = await c.charges("alice")
    assert len(charges) == expected
    assert set(charges) == set(receipts)  # every charge is a success the client received, once
    assert upstream_completed.count("get_forecast") - before == expected  # refused calls never went upstream
    account = await c.ledger.get_account(AccountKind.USER, "alice")
    assert (account.balance, account.held) == (balance - expected * PRICE, 0)
    assert await c.ledger.verify() == []
    per_replica = Counter(r.replica for r in results if r.charge_id is not None)
    return {
        "calls": calls,
        "charged": len(charges),
        "expected": expected,
        "wall_s": round(wall, 2),
        "charged_per_replica": dict(sorted(per_replica.items())),
    }


async def check_revocation(c: Cluster) -> dict[str, Any]:
    """Revoked through replica 0's CLI: refused by every replica within 1 s of the revocation."""
    key, key_id = await c.new_user("carol", "1000")
    warm = await asyncio.gather(*(c.post(i, key, tool_call("get_forecast", {"city": "x"})) for i in c.alive()))
    assert all(r.charge_id is not None for r in warm)  # every replica has the key cached now
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(c.configs[0]),
        "keys",
        "revoke",
        key_id,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    _, err = await cli.communicate()
    committed_by = time.time()  # the revocation committed before the CLI exited
    assert cli.returncode == 0, err.decode()
    revoked_at = next(k.revoked_at for k in await c.ledger.list_keys("carol") if k.id == key_id)
    assert revoked_at is not None

    async def refused_after(i: int) -> float:
        while True:
            r = await c.post(i, key, tool_call("get_forecast", {"city": "x"}))
            if r.status == 401:
                return r.started - revoked_at
            assert r.status == 200
            assert time.time() - revoked_at < 3, f"replica {i} still accepts a key revoked 3 s ago"
            await asyncio.sleep(0.02)

    delays = await asyncio.gather(*(refused_after(i) for i in c.alive()))
    # the cache bound is 1 s from the commit; revoked_at is stamped just before it, and the
    # request that found out took a little time too
    assert max(delays) <= 1.0 + 0.25, delays
    # and 1 s after the commit, no replica accepts it
    await asyncio.sleep(max(0.0, committed_by + 1.0 - time.time()))
    late = await asyncio.gather(*(c.post(i, key, tool_call("get_forecast", {"city": "x"})) for i in c.alive()))
    assert [r.status for r in late] == [401] * len(c.alive())
    return {"revoked_refused_after_s": [round(d, 3) for d in delays]}


async def check_price_change(c: Cluster) -> dict[str, Any]:
    """The shared price file is replaced (as a ConfigMap update does): every replica reloads it."""
    key, _ = await c.new_user("erin", "1000")
    before = {i: await c.digest(i) for i in c.alive()}
    assert len(set(before.values())) == 1
    changed = json.loads(json.dumps(FAULT_PRICES))
    changed["weather"]["tools"]["premium_report"] = "7"
    staged = c.prices.with_name("prices.yaml.new")
    staged.write_text(yaml.safe_dump(changed))
    os.replace(staged, c.prices)
    started = time.monotonic()
    after: dict[int, str] = {}
    async with asyncio.timeout(10):
        while len(after) < len(c.alive()):
            for i in c.alive():
                digest = await c.digest(i)
                if digest != before[i]:
                    after.setdefault(i, digest)
            await asyncio.sleep(0.05)
    took = time.monotonic() - started
    assert len(set(after.values())) == 1
    for i in c.alive():
        r = await c.post(i, key, tool_call("premium_report", {"city": "x"}))
        assert r.charge_id is not None
        assert r.body["result"]["_meta"][RECEIPT_META]["amount_cents"] == "7"
    return {"price_change_seen_by_all_s": round(took, 2)}


async def check_sessions(c: Cluster, upstream_requests: list[dict[str, Any]]) -> None:
    """initialize through replica 0; the signed session id works through replicas 1 and 2."""
    key, _ = await c.new_user("dave", "1000")
    init = rpc(
        "initialize",
        {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "replica-test", "version": "1"}},
    )
    async with c.http.post(c.url(0), json=init, headers={**HEADERS, "Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200, await resp.text()
        session = resp.headers["Mcp-Session-Id"]
    upstream_sid = session.rpartition(".")[0]
    assert upstream_sid
    for i in (1, 2):
        seen = len(upstream_requests)
        r = await c.post(i, key, tool_call("get_forecast", {"city": "x"}, 7), session=session)
        assert r.status == 200 and r.charge_id is not None, r.body
        assert upstream_requests[seen]["headers"].get("Mcp-Session-Id") == upstream_sid
    other_key, _ = await c.new_user("mallory", "1000")
    r = await c.post(1, other_key, tool_call("get_forecast", {"city": "x"}), session=session)
    assert r.status == 404  # a session is bound to the key that opened it, on every replica


async def check_sigkill(c: Cluster, upstream_completed: list[str]) -> dict[str, Any]:
    """Slow calls from 30 workers through all replicas against 151 cents; replica 2 is SIGKILLed
    while it holds some of them. Workers go on through the survivors until the money is spent."""
    balance = parse_cents("151")
    expected = balance // PRICE
    key, _ = await c.new_user("bob", format_cents(balance))
    victim = 2
    victim_pid = c.gateways[victim].proc.pid
    before = upstream_completed.count("slow")
    results: list[Result] = []
    turn = iter(range(10**9))

    async def worker() -> None:
        while (await c.ledger.get_account(AccountKind.USER, "bob")).balance >= PRICE:
            alive = c.alive()
            i = alive[next(turn) % len(alive)]
            r = await c.post(i, key, tool_call("slow", {"seconds": SLOW_S}))
            results.append(r)
            if r.charge_id is None:
                await asyncio.sleep(0.1)  # refused (money held by calls in flight) or the replica died

    started = time.monotonic()
    workers = [asyncio.create_task(worker()) for _ in range(30)]
    await poll_until(lambda: _at_least(c.pending("bob", victim_pid), 3), within=20)
    c.gateways[victim].proc.send_signal(signal.SIGKILL)
    c.dead.add(victim)
    await c.gateways[victim].proc.wait()
    killed_at = time.time()
    stranded = await c.pending("bob", victim_pid)
    assert stranded, "the victim held nothing when it died"

    # the survivors' sweepers void the dead replica's holds once their lease lapses
    async with asyncio.timeout(20):
        while True:
            states = {call: (await c.ledger.get_hold(call)).state.value for call in stranded}
            if set(states.values()) == {"voided"}:
                break
            await asyncio.sleep(0.05)
    voided_after = time.time() - killed_at
    for call in stranded:
        hold = await c.ledger.get_hold(call)
        settled_at = await c.spec.fetchval("SELECT settled_at FROM holds WHERE call_id = ?", call)
        assert settled_at >= hold.expires_at  # swept only after the lease lapsed, never early

    async with asyncio.timeout(60):
        await asyncio.gather(*workers)
    wall = time.monotonic() - started
    await poll_until(lambda: _at_least(c.pending("bob"), 0, at_most=True), within=10)

    receipts = [r.charge_id for r in results if r.charge_id is not None]
    assert len(receipts) == len(set(receipts)), "a charge id appeared on two receipts"
    charges = await c.charges("bob")
    assert len(charges) == expected
    assert set(receipts) <= set(charges)  # every receipt is a real charge
    # a charge the client never saw can only be one the victim captured as it died
    owners = await c.owners([charge.removeprefix("ch_") for charge in set(charges) - set(receipts)])
    assert all(f":{victim_pid}:" in owner for owner in owners.values()), owners
    assert upstream_completed.count("slow") - before >= expected  # each charge is a completed upstream call
    assert not any(r.charge_id for r in results if r.replica == victim and r.status is None)
    survivors_failed = [r for r in results if r.replica != victim and r.status is None]
    assert not survivors_failed, "a surviving replica dropped a call"
    account = await c.ledger.get_account(AccountKind.USER, "bob")
    assert (account.balance, account.held) == (balance - expected * PRICE, 0)
    assert await c.ledger.verify() == []
    return {
        "calls": len(results),
        "charged": len(charges),
        "expected": expected,
        "wall_s": round(wall, 2),
        "killed_replica_calls_lost": sum(1 for r in results if r.status is None),
        "stranded_holds": len(stranded),
        "stranded_voided_after_s": round(voided_after, 2),
        "lease_s": LEASE_S,
        "slow_call_s": SLOW_S,
    }


async def check_grant_burst(c: Cluster, upstream_completed: list[str]) -> dict[str, Any]:
    """With credit grants: 300 concurrent calls against 1003 cents at 5 cents, a balance large enough
    that every replica takes grants at first. The end of the balance is still exact: floor(B/p)."""
    balance, calls = parse_cents("1003"), 300
    expected = balance // PRICE
    key, _ = await c.new_user("grace", format_cents(balance))
    before = upstream_completed.count("get_forecast")
    started = time.monotonic()
    results = await _fire_burst(c, key, calls)
    wall = time.monotonic() - started
    receipts = [r.charge_id for r in results if r.charge_id is not None]
    assert len(receipts) == len(set(receipts)) == expected
    assert all(r.refused_for_funds for r in results if r.charge_id is None)
    await poll_until(lambda: _at_least(c.pending("grace"), 0, at_most=True), within=10)  # grants given back
    assert set(await c.charges("grace")) == set(receipts)
    assert upstream_completed.count("get_forecast") - before == expected
    account = await c.ledger.get_account(AccountKind.USER, "grace")
    assert (account.balance, account.held) == (balance - expected * PRICE, 0)
    assert await c.ledger.verify() == []
    return {"calls": calls, "charged": len(receipts), "expected": expected, "wall_s": round(wall, 2)}


async def check_sigkill_holding_a_grant(c: Cluster, victim: int) -> dict[str, Any]:
    """A replica SIGKILLed while it holds a credit grant: the grant returns within lease + sweep; what
    it had delivered is charged at most once (captures it had not flushed yet are lost, unbilled)."""
    key, _ = await c.new_user("heidi", "1000")
    victim_pid = c.gateways[victim].proc.pid
    results = [await c.post(victim, key, tool_call("get_forecast", {"city": f"h{i}"}, i)) for i in range(12)]
    receipts = {r.charge_id for r in results if r.charge_id is not None}
    assert len(receipts) == 12
    grants = await c.pending("heidi", victim_pid)
    assert grants and all(g.startswith("gr_") for g in grants), grants
    c.gateways[victim].proc.send_signal(signal.SIGKILL)
    c.dead.add(victim)
    await c.gateways[victim].proc.wait()
    killed_at = time.time()
    # no survivor renews the dead replica's grant: the sweep voids it once its lease lapses
    await poll_until(lambda: _at_least(c.pending("heidi"), 0, at_most=True), within=LEASE_S + SWEEP_S + 5)
    returned_after = time.time() - killed_at
    assert returned_after <= LEASE_S + SWEEP_S + 1.0, returned_after
    charges = set(await c.charges("heidi"))
    assert charges <= receipts  # never a charge the client did not get, never twice
    account = await c.ledger.get_account(AccountKind.USER, "heidi")
    assert (account.balance, account.held) == (parse_cents("1000") - len(charges) * PRICE, 0)
    assert await c.ledger.verify() == []
    return {
        "grant_returned_after_s": round(returned_after, 2),
        "delivered": len(receipts),
        "charged": len(charges),
        "unbilled_at_kill": len(receipts) - len(charges),
    }


async def test_a_replica_killed_holding_a_credit_grant_gives_it_back_within_lease_and_sweep(tmp_path: Path) -> None:
    async with run_fault_upstream() as (upstream_url, upstream):
        async with cluster(tmp_path, upstream_url, grants=True) as c:
            figures = {"grant_burst": await check_grant_burst(c, upstream.completed)}
            figures["sigkill_with_grant"] = await check_sigkill_holding_a_grant(c, victim=1)
            print("\nreplica test figures (credit grants):", json.dumps(figures, indent=2))


@pytest.mark.parametrize("grants", [False, True], ids=["per-call-holds", "credit-grants"])
async def test_three_replicas_behave_as_one_gateway(tmp_path: Path, grants: bool) -> None:
    async with run_fault_upstream() as (upstream_url, upstream):
        async with cluster(tmp_path, upstream_url, grants=grants) as c:
            figures: dict[str, Any] = {}
            figures["burst"] = await check_burst(c, upstream.completed)
            await check_sessions(c, upstream.requests)
            figures.update(await check_revocation(c))
            figures.update(await check_price_change(c))
            figures["sigkill"] = await check_sigkill(c, upstream.completed)
            # the CLI agrees: `ledger verify` through a replica's config is clean
            cli = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "--config",
                str(c.configs[0]),
                "ledger",
                "verify",
                "--json",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=REPO,
            )
            out, err = await cli.communicate()
            assert cli.returncode == 0, (out + err).decode()
            assert json.loads(out)["ok"] is True
            print("\nreplica test figures:", json.dumps(figures, indent=2))
