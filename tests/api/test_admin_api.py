"""The admin API: everything the CLI does, behind the admin token."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from gateway.api.admin import create_admin_app
from gateway.api.operations import Operations
from gateway.ledger.base import MAX_BALANCE, AccountKind, HoldRequest
from gateway.money import parse_cents
from gateway.runtime import RUNTIME
from gateway.sdk import AgentPay
from tests.harness import Gateway, run_admin, run_gateway, write_config

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
    server: TestServer, method: str, path: str, body: Any = None, token: str | None = TOKEN, **extra: str
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(extra)
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


async def test_an_amount_written_with_digits_other_than_ascii_is_refused_with_a_400_saying_so(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw, run_admin(gw, TOKEN) as server:
        assert (await call(server, "POST", "/v1/users", {"name": "alice", "balance_cents": "10"}))[0] == 201
        for amount in ("\uff15", "\u0665", "1\u0665"):  # fullwidth and Arabic-Indic fives: int() takes both
            status, body = await call(server, "POST", "/v1/users/alice/topups", {"amount_cents": amount})
            assert status == 400 and body["error"]["code"] == "invalid_input", amount
            assert "ASCII digits" in body["error"]["message"]
        status, body = await call(server, "POST", "/v1/users", {"name": "bob", "balance_cents": "\u0665\u0660"})
        assert status == 400 and "ASCII digits" in body["error"]["message"]
        assert await gw.balance("alice") == parse_cents("10")


async def test_the_operators_refund_keys_and_a_developers_never_replay_each_other(tmp_path: Path) -> None:
    """The admin API's Idempotency-Key and a developer's service API key of the same text are two
    keys: once, the developer's "k1" was stored as "acme:k1" and so "replayed" the operator's "acme:k1"."""
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw, admin(gw) as server:
        key = await gw.new_user("alice", "100")
        token = str((await gw.ops.create_token(developer="acme", servers=["weather"]))["token"])
        async with AgentPay(str(gw.server.make_url("/")).rstrip("/"), token) as pay:
            charge = await pay.charge(key, "10", "f")

            async def by_operator(idem: str) -> tuple[int, Any]:
                path = f"/v1/charges/{charge.id}/refund"
                return await call(server, "POST", path, {"amount_cents": "1"}, **{"Idempotency-Key": idem})

            status, operators = await by_operator("acme:k1")
            assert status == 201 and operators["replayed"] is False
            developers = await pay.refund(charge.id, "1", idempotency_key="k1")
            assert developers.replayed is False and developers.id != operators["id"]
            # each actor's own retry still replays its own refund
            assert (await pay.refund(charge.id, "1", idempotency_key="k1")).id == developers.id
            status, again = await by_operator("acme:k1")
            assert status == 200 and again["replayed"] is True and again["id"] == operators["id"]
            # nor can the operator reach the developer's namespace by spelling it out
            for idem in ("dev:acme:k1", "k1"):
                status, other = await by_operator(idem)
                assert status == 201 and other["replayed"] is False
        assert (await gw.ledger.get_charge(charge.id)).refunded == parse_cents("4")
        assert await gw.balance("alice") == parse_cents("94")
        await gw.verify_clean()


async def test_ten_top_ups_of_a_quadrillion_cents_are_refused_with_422_and_change_nothing(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw, admin(gw) as server:
        assert (await call(server, "POST", "/v1/users", {"name": "alice", "balance_cents": "50"}))[0] == 201
        for i in range(10):
            status, body = await call(
                server, "POST", "/v1/users/alice/topups", {"amount_cents": "1000000000000000", "reference": f"big-{i}"}
            )
            assert status == 422, body
            assert body["error"]["code"] == "amount_too_large"
            assert "over the most one request may move (1000000000000 cents)" in body["error"]["message"]
            assert body["error"]["hint"].startswith("Nothing was changed")
        status, body = await call(server, "POST", "/v1/users", {"name": "bob", "balance_cents": "1000000000000000"})
        assert status == 422 and body["error"]["code"] == "amount_too_large"
        status, user = await call(server, "GET", "/v1/users/alice")
        assert status == 200 and user["balance_cents"] == "50"

        # up to the limit is fine; past it, even by a thousandth of a cent, is refused and changes nothing
        status, body = await call(server, "POST", "/v1/users/alice/topups", {"amount_cents": "999999999950"})
        assert status == 201 and body["balance_cents"] == "1000000000000"
        status, body = await call(server, "POST", "/v1/users/alice/topups", {"amount_cents": "0.001"})
        assert status == 422 and body["error"]["code"] == "balance_limit_exceeded", body
        assert "1000000000000 cents" in body["error"]["message"] and body["error"]["hint"]
        status, user = await call(server, "GET", "/v1/users/alice")
        assert status == 200 and user["balance_cents"] == user["available_cents"] == "1000000000000"
        world = await gw.ledger.get_account(AccountKind.WORLD, "system")
        assert type(world.balance) is int and world.balance == -MAX_BALANCE
        status, verified = await call(server, "GET", "/v1/ledger/verify")
        assert status == 200 and verified == {"ok": True, "violations": []}
