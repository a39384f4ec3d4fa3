"""The gateway with ``credit_grants: true``: paid calls held and captured in memory against a grant,
written in batches. Real HTTP, a real upstream (the fault upstream) and a real SQLite ledger."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.ledger import open_ledger
from gateway.ledger.base import AccountKind
from gateway.ledger.grants import GRANT_METHOD
from gateway.money import format_cents, parse_cents
from gateway.proxy import RECEIPT_META
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, Gateway, run_gateway, tool_call, write_config

PRICE = parse_cents("5")
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@asynccontextmanager
async def grants_gateway(tmp_path: Path, **top: Any) -> AsyncIterator[tuple[Gateway, aiohttp.ClientSession]]:
    async with run_fault_upstream() as (upstream_url, _):
        config = write_config(
            tmp_path,
            {"weather": upstream_url},
            FAULT_PRICES,
            credit_grants=True,
            rate_per_key=0,
            max_concurrent_per_key=0,
            **top,
        )
        async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
            yield gw, http


async def _call(gw: Gateway, http: aiohttp.ClientSession, key: str, i: int = 1) -> dict[str, Any]:
    headers = {**HEADERS, "Authorization": f"Bearer {key}"}
    async with http.post(gw.url(), json=tool_call("get_forecast", {"city": f"c{i}"}, i), headers=headers) as resp:
        assert resp.status == 200
        body: dict[str, Any] = json.loads(await resp.read())
        return body


def _receipt(body: dict[str, Any]) -> dict[str, Any] | None:
    meta = (body.get("result") or {}).get("_meta") or {}
    receipt = meta.get(RECEIPT_META)
    return receipt if isinstance(receipt, dict) else None


async def _grant_rows(gw: Gateway, user: str) -> list[tuple[str, str, int]]:
    """(id, state, amount) of every grant row of ``user``, read straight from the SQLite file."""
    with sqlite3.connect(gw.rt.config.database.removeprefix("sqlite:///")) as conn:
        rows = conn.execute(
            "SELECT h.call_id, h.state, h.amount FROM holds h JOIN accounts a ON a.id = h.user_account_id "
            "WHERE a.name = ? AND h.method = ? ORDER BY h.created_at",
            (user, GRANT_METHOD),
        ).fetchall()
    return [(str(r[0]), str(r[1]), int(r[2])) for r in rows]


async def _until(check: Callable[[], Awaitable[bool]], within: float) -> None:
    """Poll state kept in the database (written by the gateway's background tasks) until it holds."""
    async with asyncio.timeout(within):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


async def test_paid_calls_are_held_out_of_one_grant_and_each_charged_once(tmp_path: Path) -> None:
    async with grants_gateway(tmp_path) as (gw, http):
        key = await gw.new_user("alice", "1000")
        bodies = [await _call(gw, http, key, i) for i in range(20)]
        receipts = [_receipt(b) for b in bodies]
        assert all(r is not None for r in receipts)
        await gw.settled()
        grants = await _grant_rows(gw, "alice")
        assert len(grants) <= 2  # a database hold (topped up ahead of need) served many calls
        assert grants[-1][1] == "pending"
        charges = {c.id: c for c in await gw.ledger.list_charges(user="alice", limit=100)}
        assert set(charges) == {r["charge_id"] for r in receipts if r is not None}
        assert all(c.amount == PRICE for c in charges.values())
        assert await gw.balance("alice") == parse_cents("1000") - 20 * PRICE
        assert await gw.earnings() == 20 * PRICE
        assert await gw.ledger.verify() == []


async def test_a_grant_idle_for_idle_s_is_given_back(tmp_path: Path) -> None:
    async with grants_gateway(tmp_path) as (gw, http):
        key = await gw.new_user("alice", "1000")
        await _call(gw, http, key)
        await gw.settled()
        assert await gw.held("alice") > 0  # the grant's unused part

        async def returned() -> bool:
            return await gw.held("alice") == 0

        assert gw.rt.billing.grants is not None
        policy = gw.rt.billing.grants.policy
        await _until(returned, within=policy.idle_s + 2 * policy.tick + 1.0)
        assert [state for _, state, _ in await _grant_rows(gw, "alice")] == ["voided"]
        assert await gw.balance("alice") == parse_cents("1000") - PRICE
        assert await gw.ledger.verify() == []


async def test_the_end_of_a_balance_is_exact_with_grants(tmp_path: Path) -> None:
    async with grants_gateway(tmp_path) as (gw, http):
        balance = parse_cents("1003")
        key = await gw.new_user("alice", format_cents(balance))
        bodies = await asyncio.gather(*(_call(gw, http, key, i) for i in range(260)))
        paid = [b for b in bodies if _receipt(b) is not None]
        refused = [b for b in bodies if _receipt(b) is None]
        assert len(paid) == balance // PRICE
        assert all("insufficient" in json.dumps(b).lower() for b in refused)
        await gw.settled()
        assert len(await gw.ledger.list_charges(user="alice", limit=1000)) == balance // PRICE
        assert await gw.balance("alice") == balance % PRICE
        assert await gw.ledger.verify() == []


async def test_a_revoked_key_gives_its_grant_back_within_key_cache_s(tmp_path: Path) -> None:
    async with grants_gateway(tmp_path, key_cache_s=0.5) as (gw, http):
        key = await gw.new_user("alice", "1000")
        await _call(gw, http, key)
        await gw.settled()
        assert await gw.held("alice") > 0
        record = (await gw.ledger.list_keys("alice"))[0]
        started = asyncio.get_running_loop().time()
        await gw.ledger.revoke_key(record.id)

        async def returned() -> bool:
            return await gw.held("alice") == 0

        await _until(returned, within=5)
        assert asyncio.get_running_loop().time() - started <= 0.5 + 0.25
        assert await gw.ledger.verify() == []


async def test_a_low_balance_takes_per_call_holds_until_a_top_up(tmp_path: Path) -> None:
    async with grants_gateway(tmp_path, key_cache_s=0.2) as (gw, http):
        key = await gw.new_user("alice", "100")  # below share * min_calls * price: no grant
        assert _receipt(await _call(gw, http, key)) is not None
        await gw.settled()
        assert await _grant_rows(gw, "alice") == []
        await gw.ops.topup("alice", "1000")

        async def granted() -> bool:
            assert _receipt(await _call(gw, http, key)) is not None
            return bool(await _grant_rows(gw, "alice"))

        await _until(granted, within=5)
        await gw.settled()
        assert await gw.ledger.verify() == []


async def test_a_drain_writes_queued_captures_and_gives_every_grant_back(tmp_path: Path) -> None:
    async with grants_gateway(tmp_path) as (gw, http):
        key = await gw.new_user("alice", "1000")
        bodies = await asyncio.gather(*(_call(gw, http, key, i) for i in range(30)))
        receipts = {r["charge_id"] for b in bodies if (r := _receipt(b)) is not None}
        config = gw.rt.config
    reopened = open_ledger(config.database)
    await reopened.open()
    try:
        account = await reopened.get_account(AccountKind.USER, "alice")
        assert account.held == 0
        assert {c.id for c in await reopened.list_charges(user="alice", limit=100)} == receipts
        assert account.balance == parse_cents("1000") - len(receipts) * PRICE
        assert await reopened.verify() == []
    finally:
        await reopened.close()


@pytest.mark.parametrize("grants", [False, True])
async def test_the_config_switch_decides_whether_grants_are_used(tmp_path: Path, grants: bool) -> None:
    async with run_fault_upstream() as (upstream_url, _):
        config = write_config(tmp_path, {"weather": upstream_url}, FAULT_PRICES, credit_grants=grants)
        async with run_gateway(config) as gw, aiohttp.ClientSession() as http:
            assert (gw.rt.billing.grants is not None) is grants
            key = await gw.new_user("alice", "1000")
            assert _receipt(await _call(gw, http, key)) is not None
            await gw.settled()
            assert bool(await _grant_rows(gw, "alice")) is grants
            assert await gw.ledger.verify() == []


def test_credit_grants_is_a_boolean_and_off_by_default(tmp_path: Path) -> None:
    assert load_config(write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})).credit_grants is False
    on = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"}, credit_grants=True)
    assert load_config(on).credit_grants is True
    bad = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"}, credit_grants="sometimes")
    with pytest.raises(ConfigError, match="credit_grants"):
        load_config(bad)


def test_credit_grants_flush_ms_is_whole_milliseconds_from_1_to_1000_defaulting_to_10(tmp_path: Path) -> None:
    upstreams: dict[str, str | None] = {"weather": "http://127.0.0.1:9/mcp"}
    assert load_config(write_config(tmp_path, upstreams)).credit_grants_flush_ms == 10
    assert load_config(write_config(tmp_path, upstreams, credit_grants_flush_ms=2)).credit_grants_flush_ms == 2
    assert load_config(write_config(tmp_path, upstreams, credit_grants_flush_ms=1000)).credit_grants_flush_ms == 1000
    for bad, said in ((0, "at least 1"), (1001, "at most 1000"), (2.5, "whole number"), ("10ms", "whole number")):
        with pytest.raises(ConfigError, match=f"credit_grants_flush_ms.*{said}"):
            load_config(write_config(tmp_path, upstreams, credit_grants_flush_ms=bad))
