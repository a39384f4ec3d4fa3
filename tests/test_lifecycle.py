"""The gateway as a process: graceful drain on SIGTERM, leases, health, metrics (admin listener) and logs."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
from structlog.testing import capture_logs

from gateway.api.operations import Operations
from gateway.ledger.base import AccountKind
from gateway.money import parse_cents
from tests.fault_upstream import run_fault_upstream
from tests.harness import (
    FAULT_PRICES,
    mcp_client,
    new_user,
    prepared_ledger,
    run_admin,
    run_gateway,
    tool_call,
    write_config,
)
from tests.process import run_gateway_process
from tests.upstream_sdk import run_upstream

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


async def test_sigterm_lets_an_in_flight_call_finish_and_settle_before_exit(tmp_path: Path) -> None:
    async with run_upstream(json_response=True, stateless=True) as up:
        config = write_config(tmp_path, {"weather": up.url})
        async with prepared_ledger(config) as ledger:
            key = await new_user(Operations(ledger), "alice", "100")
            async with run_gateway_process(config) as gw:
                async with aiohttp.ClientSession() as http:
                    call = asyncio.create_task(
                        http.post(
                            gw.url(),
                            json=tool_call("wait_for_release"),
                            headers={**HEADERS, "Authorization": f"Bearer {key}"},
                        )
                    )
                    async with asyncio.timeout(10):
                        await up.log.started.wait()
                    gw.proc.send_signal(signal.SIGTERM)
                    up.log.release.set()
                    resp = await call
                    body = await resp.json()
                    assert resp.status == 200
                    assert body["result"]["_meta"]["io.agentpay/receipt"]["amount_cents"] == "5"
                assert await gw.exited() == 0
            account = await ledger.get_account(AccountKind.USER, "alice")
            assert (account.balance, account.held) == (parse_cents("95"), 0)
            assert await ledger.verify() == []


async def test_a_long_call_keeps_its_hold_while_the_sweeper_runs(tmp_path: Path) -> None:
    async with run_upstream(json_response=True, stateless=True) as up:
        config = write_config(tmp_path, {"weather": up.url}, hold_lease_s=0.3, sweep_interval_s=0.05)
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100")
            async with mcp_client(gw.url(), key) as client:
                call = asyncio.create_task(client.call_tool("wait_for_release", {}))
                async with asyncio.timeout(10):
                    await up.log.started.wait()
                # Several leases' worth of time passes while the tool runs: renewals keep the hold.
                async with asyncio.timeout(10):
                    await gw.rt.billing.wait_renewals(6)
                assert await gw.held("alice") == parse_cents("5")
                up.log.release.set()
                result = await call
            assert not result.is_error
            await gw.verify_clean()
            assert await gw.balance("alice") == parse_cents("95")


async def test_the_public_listener_serves_health_and_a_bare_readiness_but_no_metrics(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, _),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(gw.server.make_url("/healthz")) as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        async with http.get(gw.server.make_url("/readyz")) as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ready"}  # no price digest
        async with http.get(gw.server.make_url("/metrics")) as resp:
            assert resp.status == 404  # revenue per server: on the admin listener only
            assert "agentpay_" not in await resp.text()


async def test_metrics_are_served_on_the_admin_listener_only_with_the_admin_token(tmp_path: Path) -> None:
    token = "admin-" + "t" * 32
    async with (
        run_fault_upstream() as (url, _),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
        run_admin(gw, token) as admin,
    ):
        key = await gw.new_user("alice", "100")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                gw.url(), json=tool_call("get_forecast"), headers={**HEADERS, "Authorization": f"Bearer {key}"}
            ):
                pass
            await gw.settled()
            for wrong in ({}, {"Authorization": "Bearer wrong"}):
                async with http.get(admin.make_url("/metrics"), headers=wrong) as resp:
                    assert resp.status == 401 and "agentpay_" not in await resp.text()
            async with http.get(admin.make_url("/metrics"), headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
                text = await resp.text()
        assert 'agentpay_charges_total{server="weather"} 1.0' in text
        assert 'agentpay_charged_millicents_total{server="weather"} 5000.0' in text
        assert f'agentpay_price_table_info{{digest="{gw.rt.prices.table.digest}"}} 1.0' in text
        assert 'agentpay_requests_total{method="tools/call",outcome="charged",server="weather"} 1.0' in text
        assert key not in text


async def test_one_canonical_log_line_per_request_and_never_a_key(tmp_path: Path) -> None:
    async with (
        run_fault_upstream() as (url, _),
        run_gateway(write_config(tmp_path, {"weather": url}, FAULT_PRICES)) as gw,
    ):
        key = await gw.new_user("alice", "100")
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as http:
                for target in (gw.url(), gw.url(path_key=key)):
                    async with http.post(
                        target, json=tool_call("get_forecast"), headers={**HEADERS, "Authorization": f"Bearer {key}"}
                    ):
                        pass
                async with http.post(
                    gw.url(), json=tool_call("get_forecast"), headers={**HEADERS, "Authorization": "Bearer ap_wrong"}
                ):
                    pass
            await gw.settled()
        lines = [entry for entry in logs if entry["event"] == "request"]
        assert len(lines) == 3
        assert lines[0]["outcome"] == "charged" and lines[0]["price_cents"] == "5" and lines[0]["key"] == key[:11]
        assert lines[1]["path"] == "/k/<redacted>/weather/mcp"
        assert lines[2]["status"] == 401
        assert key not in json.dumps(logs, default=str)
