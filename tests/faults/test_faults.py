"""Fault injection against the real gateway process and the audited upstream process.

Each test prints its seed first (``FAULT_SEED=<n>`` replays the same schedule) and the run's
figures last; every run is audited (see ``tests.faults.harness``): charges only for completed
upstream successes, never twice, ``ledger verify`` clean, no hold outliving its lease + one sweep
interval, money conserved. The long version is ``python -m tests.faults.soak --kills 100``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from gateway.billing.settlement import Billing
from tests.faults.harness import (
    PG_DSN,
    UPSTREAM_FAULTS,
    Report,
    Scenario,
    make_spec,
    run_scenario,
    seed_from_env,
    small_filesystem,
)

pytestmark = pytest.mark.timeout(90)


def assert_clean(report: Report) -> None:
    assert report.violations == [], f"seed {report.seed}:\n{report.figures()}"
    assert report.double_charges == 0
    assert report.money_created == 0
    assert report.stranded_holds == 0
    assert report.verify == []
    assert report.charged > 0, f"seed {report.seed}: nothing was charged, the run proved nothing"


async def test_gateway_sigkill_restart_cycles_under_concurrent_traffic(tmp_path: Path) -> None:
    scenario = Scenario("gateway-sigkill", min_calls=80, concurrency=16, gateway_kills=4)
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert report.gateway_kills == 4
    cut = sum(n for outcome, n in report.outcomes.items() if outcome.startswith("error:"))
    assert cut > 0, "no call was in flight when the gateway was killed"


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
async def test_sigkill_restart_cycles_with_credit_grants_charge_nothing_twice_and_strand_nothing(
    tmp_path: Path, database: str
) -> None:
    """With grants on, a kill loses at most the captures not flushed yet (delivered, unbilled: the
    figures report their share), never charges twice, and the dead process's grants are swept."""
    scenario = Scenario(
        "gateway-sigkill-grants",
        min_calls=120,
        concurrency=16,
        gateway_kills=4,
        faults={fault: 1.0 for fault in UPSTREAM_FAULTS},
        fault_share=0.15,
        cancel_share=0.05,
        database=database,
        credit_grants=True,
    )
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert report.gateway_kills == 4
    assert report.swept_holds > 0, "no grant or hold was left behind by a kill: the run proved nothing"
    print(report.figures())


async def test_upstream_faults_void_the_hold_and_charge_nothing(tmp_path: Path) -> None:
    scenario = Scenario(
        "upstream-faults", min_calls=100, faults={fault: 1.0 for fault in UPSTREAM_FAULTS}, fault_share=0.6
    )
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert set(UPSTREAM_FAULTS) <= set(report.faults)
    # slow-but-in-time answers are charged; every other fault charges nothing (checked per charge)
    assert report.charged_by_fault["none"] > 0
    expected = {
        "timeout": "http_504",
        "slow_body_timeout": "http_504",
        "5xx": "http_5",
        "reset": "http_502",
        "truncate_json": "http_502",
        "rpc_error": "rpc_error",
        "tool_error": "tool_error",
        "truncate_sse": "stream_ended_without_answer",
        "end_sse": "stream_ended_without_answer",
    }
    for fault, outcome in expected.items():
        seen = {o for (f, o), n in report.by_fault.items() if f == fault}
        assert seen and all(o.startswith(outcome) for o in seen), (fault, seen, report.seed)
    assert report.unbilled_successes == 0


async def test_upstream_sigkill_mid_stream(tmp_path: Path) -> None:
    scenario = Scenario(
        "upstream-sigkill", min_calls=40, sse_share=1.0, stream_events=(2, 5), gap_s=(0.05, 0.15), upstream_kills=2
    )
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert report.upstream_kills == 2
    assert report.outcomes["stream_ended_without_answer"] > 0, "no stream was cut by the kill"


async def test_client_disconnect_mid_stream(tmp_path: Path) -> None:
    scenario = Scenario(
        "client-disconnect", min_calls=60, sse_share=0.8, stream_events=(1, 4), gap_s=(0.02, 0.1), cancel_share=0.5
    )
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert report.outcomes["cancelled"] > 0
    # a client that leaves just after the answer reached its socket may be charged (delivered);
    # the audit fails any charge for a call whose client was answered with an error


async def test_sqlite_locked_by_another_process(tmp_path: Path) -> None:
    # one lock shorter than busy_timeout (calls wait), one longer (the head of the queue fails)
    scenario = Scenario("sqlite-locked", min_calls=60, sqlite_locks=(0.5, 5.5))
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert report.sqlite_locks == 2
    locked = sum(n for event, n in report.log_events.items() if "ledger locked" in event or "unavailable" in event)
    assert locked > 0, f"nothing noticed the 5.5 s lock: {report.log_events}"


async def test_disk_full(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, "4m") as fs:
        report = await run_scenario(
            tmp_path,
            Scenario("disk-full", min_calls=60),
            seed_from_env(),
            lambda run: [lambda: run.fill_disk(fs, restart_after=True)],
            ledger_dir=fs,
        )
    assert_clean(report)
    assert report.disk_full_windows == 1
    assert not report.notes, report.notes
    assert any(outcome.startswith("http_5") for outcome in report.outcomes), "no call failed on the full disk"


async def test_holds_are_voided_after_a_disk_full_episode_without_a_restart(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, "4m") as fs:
        report = await run_scenario(
            tmp_path,
            Scenario("disk-full-no-restart", min_calls=40),
            seed_from_env(),
            lambda run: [
                lambda: run.fill_disk(fs, restart_after=False, min_full_s=run.sc.timing.hold_lease_s * 1.5),
                lambda: run.wait_calls(20),
            ],
            ledger_dir=fs,
        )
    assert report.stranded_holds == 0 and report.violations == [], report.figures()


async def test_the_sweeper_keeps_sweeping_after_a_storage_error() -> None:
    class FullDiskLedger:
        def __init__(self) -> None:
            self.sweeps = 0
            self.second = asyncio.Event()

        async def sweep(self) -> int:
            self.sweeps += 1
            if self.sweeps == 1:
                raise sqlite3.OperationalError("database or disk is full")
            self.second.set()
            return 0

    ledger = FullDiskLedger()
    billing = Billing(ledger, owner="test", lease_s=1.0, sweep_interval_s=0.01)  # type: ignore[arg-type]
    sweeper = asyncio.create_task(billing.sweep_forever())
    second = asyncio.create_task(ledger.second.wait())
    try:
        done, _ = await asyncio.wait({sweeper, second}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert second in done, "the sweeper died on the storage error"
    finally:
        sweeper.cancel()
        second.cancel()
        await asyncio.gather(sweeper, second, return_exceptions=True)


async def test_a_full_disk_is_answered_with_a_json_rpc_503(tmp_path: Path) -> None:
    with small_filesystem(tmp_path, "4m") as fs:
        report = await run_scenario(
            tmp_path,
            Scenario("disk-full-answer", min_calls=30, sse_share=0.0),
            seed_from_env(),
            lambda run: [lambda: run.fill_disk(fs, restart_after=True)],
            ledger_dir=fs,
        )
    assert "http_500" not in report.outcomes, report.figures()
    assert report.outcomes["http_503"] > 0


async def _postgres_available() -> bool:
    try:
        conn = await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def test_postgres_connections_killed_mid_transaction(tmp_path: Path) -> None:
    if not await _postgres_available():
        pytest.skip(f"PostgreSQL is not reachable at {PG_DSN}")
    scenario = Scenario("pg-terminate", min_calls=80, database="postgres", pg_terminations=3, gateway_kills=2)
    report = await run_scenario(tmp_path, scenario, seed_from_env())
    assert_clean(report)
    assert report.pg_terminations > 0
    assert any("active" in note or "in transaction" in note for note in report.notes), report.notes


def test_a_replay_draws_the_same_schedule() -> None:
    scenario = Scenario("replay", faults={fault: 1.0 for fault in UPSTREAM_FAULTS}, fault_share=0.5, cancel_share=0.3)
    first = [make_spec(42, i, scenario) for i in range(200)]
    assert first == [make_spec(42, i, scenario) for i in range(200)]
    assert first != [make_spec(43, i, scenario) for i in range(200)]
    assert len({spec.nonce for spec in first}) == 200
