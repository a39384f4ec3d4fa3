"""The admin API: everything the CLI does, behind the admin token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.admin_api import create_admin_app
from gateway.ledger.base import HoldRequest
from gateway.money import parse_cents
from gateway.operations import Operations
from gateway.runtime import RUNTIME
from tests.harness import Gateway, run_gateway, write_config

TOKEN = "admin-secret-token-0123456789"


@asynccontextmanager
async def admin(gw: Gateway, token: str | None = TOKEN) -> AsyncIterator[TestServer]:
    app = create_admin_app(lambda: Operations(gw.ledger, gw.rt.config), token)
    app[RUNTIME] = gw.rt
    server = TestServer(app, host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


async def call(
    server: TestServer, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, server.make_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json(
            content_type=None
        ) if resp.content_type == "application/json" else await resp.text()


async def test_the_admin_api_is_unreachable_without_the_right_token(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw:
        async with admin(gw) as server:
            for token in (None, "wrong", TOKEN + "x"):
                status, body = await call(server, "POST", "/v1/users", {"name": "eve", "balance_cents": "1000"}, token)
                assert status == 401 and body["error"]["code"] == "admin_unauthorized"
        async with admin(gw, token=None) as server:
            status, body = await call(server, "GET", "/v1/ledger/verify")
            assert status == 503 and "no admin token" in body["error"]["message"]
        assert await gw.ledger.list_keys() == []


async def test_an_operator_runs_the_whole_money_cycle_over_http(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw, admin(gw) as server:
        assert (await call(server, "POST", "/v1/users", {"name": "alice", "balance_cents": "50"}))[0] == 201
        status, topup = await call(
            server, "POST", "/v1/users/alice/topups", {"amount_cents": "50", "reference": "inv-1"}
        )
        assert status == 201 and topup["balance_cents"] == "100"
        status, again = await call(
            server, "POST", "/v1/users/alice/topups", {"amount_cents": "50", "reference": "inv-1"}
        )
        assert status == 200 and again["replayed"] is True
        status, key = await call(server, "POST", "/v1/keys", {"user": "alice", "server": "weather"})
        assert status == 201 and key["key"].startswith("ap_")
        status, token = await call(server, "POST", "/v1/tokens", {"developer": "acme", "servers": ["weather"]})
        assert status == 201 and token["token"].startswith("apst_")
        listed = (await call(server, "GET", "/v1/tokens"))[1]
        assert token["token"] not in str(listed) and listed[0]["prefix"] == token["prefix"]

        charge = await gw.ledger.charge(
            HoldRequest(
                call_id="svc_test", key_id=key["id"], user="alice", developer="acme", server="weather",
                method="service", name="f", amount=parse_cents("30"), fee=0, lease_s=60, owner="t",
            )
        )  # fmt: skip
        assert charge.charge is not None
        status, refund = await call(server, "POST", f"/v1/charges/{charge.charge.id}/refund", {"amount_cents": "10"})
        assert status == 201 and refund["amount_cents"] == "10"
        status, payout = await call(server, "POST", "/v1/payouts", {"developer": "acme"})
        assert status == 201 and payout["amount_cents"] == "20" and payout["state"] == "pending"
        status, settled = await call(server, "POST", f"/v1/payouts/{payout['id']}/settle", {"reference": "bank-42"})
        assert status == 200 and settled["state"] == "settled"
        status, earned = await call(server, "GET", "/v1/developers/acme/earnings")
        assert earned == {"developer": "acme", "earnings_cents": "0", "lifetime_cents": "20"}
        status, user = await call(server, "GET", "/v1/users/alice")
        assert user["balance_cents"] == "80"
        assert (await call(server, "POST", f"/v1/keys/{key['id']}/revoke"))[1]["revoked_at"] is not None
        status, verified = await call(server, "GET", "/v1/ledger/verify")
        assert status == 200 and verified == {"ok": True, "violations": []}


async def test_admin_errors_share_the_api_error_shape(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw, admin(gw) as server:
        status, body = await call(server, "POST", "/v1/users/nobody/topups", {"amount_cents": "5"})
        assert status == 404 and set(body) == {"error"} and body["error"]["code"] == "not_found"
        status, body = await call(server, "POST", "/v1/users", {"name": "x", "balance_cents": 0.1})
        assert status == 400 and body["error"]["code"] == "invalid_input"
