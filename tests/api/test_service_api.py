"""The service API and the SDK, against a real gateway and a real SQLite ledger."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.ledger.base import AccountKind
from gateway.money import parse_cents
from gateway.sdk import (
    AgentPay,
    AgentPayError,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidKey,
    InvalidServiceToken,
)
from tests.harness import Gateway, run_gateway, write_config


async def setup(gw: Gateway, balance: str = "100") -> tuple[str, str]:
    """A user key for 'tools' and a service token of its owner."""
    key = await gw.new_user("alice", balance, server="tools")
    token = await gw.ops.create_token(developer="acme", servers=["tools"])
    return key, str(token["token"])


async def api(
    gw: Gateway, method: str, path: str, token: str | None, body: Any = None, **headers: str
) -> tuple[int, Any]:
    hdrs = dict(headers)
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, gw.server.make_url(path), json=body, headers=hdrs) as resp,
    ):
        return resp.status, await resp.json()


def base_url(gw: Gateway) -> str:
    return str(gw.server.make_url("/")).rstrip("/")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"tools": None}, {})


async def test_every_api_error_has_one_shape_with_a_stable_code(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw, "1")
        five = {"key": key, "amount_cents": "5", "feature": "f"}
        cases = [
            (await api(gw, "POST", "/v1/charges", None, {}), 401, "invalid_service_token"),
            (await api(gw, "POST", "/v1/keys/validate", token, {"key": "ap_nope"}), 422, "invalid_key"),
            (await api(gw, "POST", "/v1/charges", token, five), 400, "invalid_input"),  # no Idempotency-Key
            (
                await api(gw, "POST", "/v1/charges", token, {**five, "amount_cents": 0.5}, **{"Idempotency-Key": "a"}),
                400,
                "invalid_input",
            ),
            (await api(gw, "POST", "/v1/charges", token, five, **{"Idempotency-Key": "b"}), 402, "insufficient_funds"),
        ]
        for (status, body), want_status, want_code in cases:
            assert status == want_status, body
            assert set(body) == {"error"}
            assert body["error"]["code"] == want_code
            assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert cases[-1][0][1]["error"]["details"] == {"price_cents": "5", "available_cents": "1"}


async def test_validate_reports_the_user_and_available_balance_without_echoing_secrets(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        status, body = await api(gw, "POST", "/v1/keys/validate", token, {"key": key})
        assert status == 200
        assert body == {
            "valid": True,
            "user": "alice",
            "server": "tools",
            "key_prefix": key[:11],
            "available_cents": "100",
        }
        assert key not in str(body) and token not in str(body)


async def test_a_charge_moves_money_once_and_a_retry_returns_the_original(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        body = {"key": key, "amount_cents": "2.5", "feature": "search"}
        first = await api(gw, "POST", "/v1/charges", token, body, **{"Idempotency-Key": "job-1"})
        again = await api(gw, "POST", "/v1/charges", token, body, **{"Idempotency-Key": "job-1"})
        assert first[0] == 201 and again[0] == 200
        assert first[1]["id"] == again[1]["id"] and again[1]["replayed"] is True
        assert first[1]["balance_cents"] == "97.5"
        conflict = await api(
            gw, "POST", "/v1/charges", token, {**body, "amount_cents": "3"}, **{"Idempotency-Key": "job-1"}
        )
        assert conflict[0] == 409 and conflict[1]["error"]["code"] == "idempotency_conflict"
        assert await gw.balance("alice") == parse_cents("97.5")
        assert await gw.earnings() == parse_cents("2.5")
        await gw.verify_clean()


async def test_concurrent_charges_never_overdraw_and_one_key_charges_once(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw, "10")
        async with AgentPay(base_url(gw), token) as pay:
            distinct = await asyncio.gather(
                *(pay.charge(key, 3, "f", idempotency_key=f"k{i}") for i in range(30)), return_exceptions=True
            )
            assert sum(not isinstance(r, BaseException) for r in distinct) == 3
            assert all(isinstance(r, InsufficientBalance) for r in distinct if isinstance(r, BaseException))
            await gw.ops.topup("alice", "100")
            same = await asyncio.gather(*(pay.charge(key, 3, "f", idempotency_key="once") for _ in range(20)))
            assert len({r.id for r in same}) == 1
        assert await gw.balance("alice") == parse_cents("110") - 4 * parse_cents("3")
        await gw.verify_clean()


async def test_a_hold_can_be_captured_partly_or_released_and_expires_unused(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        async with AgentPay(base_url(gw), token) as pay:
            held = await pay.hold(key, "10", "render")
            assert held.available_cents == Decimal("90")
            receipt = await pay.capture(held.id, "4.25")
            assert receipt.amount_cents == Decimal("4.25")
            other = await pay.hold(key, "10", "render")
            assert await pay.release(other.id) is True
            stale = await pay.hold(key, "10", "render", ttl_s=1)
            assert await gw.ledger.sweep(now=10**10) == 1
            with pytest.raises(AgentPayError) as voided:
                await pay.capture(stale.id)
            assert voided.value.status == 409
        assert await gw.balance("alice") == parse_cents("95.75")
        await gw.verify_clean()


async def test_refunds_are_reversals_and_cannot_exceed_the_charge(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        async with AgentPay(base_url(gw), token) as pay:
            charge = await pay.charge(key, "10", "f")
            part = await pay.refund(charge.id, "4")
            rest = await pay.refund(charge.id)
            assert (part.amount_cents, rest.amount_cents) == (Decimal("4"), Decimal("6"))
            with pytest.raises(AgentPayError) as refused:
                await pay.refund(charge.id, "1")
            assert (refused.value.status, refused.value.code) == (409, "conflict")
            listed = await pay.charges()
            assert listed["charges"][0]["refunded_cents"] == "10"
            earned = await pay.earnings()
            assert earned["earnings_cents"] == "0"
            assert [line["kind"] for line in earned["statement"]][:3] == ["refund", "refund", "charge"]
        assert await gw.balance("alice") == parse_cents("100")
        await gw.verify_clean()


async def test_the_sdk_refuses_floats_and_raises_typed_errors(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        async with AgentPay(base_url(gw), token) as pay:
            with pytest.raises(TypeError):
                await pay.charge(key, 0.1, "f")  # type: ignore[arg-type]
            with pytest.raises(InvalidKey):
                await pay.validate("ap_not_a_key")
            info = await pay.validate(key)
            assert (info.user, info.server, info.available_cents) == ("alice", "tools", Decimal("100"))
            with pytest.raises(IdempotencyConflict):
                await pay.charge(key, 1, "f", idempotency_key="x")
                await pay.charge(key, 2, "f", idempotency_key="x")
        async with AgentPay(base_url(gw), "apst_wrong") as bad:
            with pytest.raises(InvalidServiceToken):
                await bad.validate(key)


async def test_sdk_retries_after_a_lost_response_reuse_the_idempotency_key_and_charge_once(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        attempts: list[str] = []

        async def flaky(request: web.Request) -> web.StreamResponse:
            """Forwards to the gateway, but drops the connection after the first charge went through."""
            attempts.append(request.headers.get("Idempotency-Key", ""))
            async with (
                aiohttp.ClientSession() as http,
                http.request(
                    request.method, gw.server.make_url(request.path), data=await request.read(), headers=request.headers
                ) as resp,
            ):
                body = await resp.read()
            if len(attempts) == 1 and request.transport is not None:
                request.transport.abort()  # the charge happened; its answer is lost
            return web.Response(body=body, status=resp.status, content_type="application/json")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", flaky)
        proxy = TestServer(app, host="127.0.0.1", port=None)
        await proxy.start_server()
        try:
            async with AgentPay(str(proxy.make_url("/")).rstrip("/"), token) as pay:
                receipt = await pay.charge(key, "7", "f")
            assert receipt.replayed is True
            assert len(attempts) == 2 and attempts[0] == attempts[1] != ""
        finally:
            await proxy.close()
        assert await gw.balance("alice") == parse_cents("93")
        await gw.verify_clean()


async def test_a_token_cannot_touch_another_developers_charges_or_holds(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"tools": None, "maps": None}, {}, server_options={"maps": {"owner": "rival"}})
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        rival = str((await gw.ops.create_token(developer="rival", servers=["maps"]))["token"])
        async with AgentPay(base_url(gw), token) as pay:
            charge = await pay.charge(key, "1", "f")
            held = await pay.hold(key, "1", "f")
        for path in (f"/v1/charges/{charge.id}/refund", f"/v1/holds/{held.id}/capture", f"/v1/holds/{held.id}/release"):
            status, body = await api(gw, "POST", path, rival, {})
            assert status == 404 and body["error"]["code"] == "not_found"
        status, body = await api(gw, "POST", "/v1/keys/validate", rival, {"key": key})
        assert status == 422 and body["error"]["code"] == "wrong_server"
        assert (await gw.ledger.get_account(AccountKind.DEVELOPER, "acme")).balance == parse_cents("1")


async def test_a_token_scoped_to_one_server_cannot_refund_capture_or_release_on_another_server_of_its_developer(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, {"tools": None, "maps": None}, {})  # both servers belong to acme
    async with run_gateway(config) as gw:
        _, tools_token = await setup(gw)
        maps_key = str((await gw.ops.create_key(user="alice", server="maps"))["key"])
        maps_token = str((await gw.ops.create_token(developer="acme", servers=["maps"]))["token"])
        async with AgentPay(base_url(gw), maps_token) as maps:
            charge = await maps.charge(maps_key, "5", "route")
            held = await maps.hold(maps_key, "3", "route")
        before = (await gw.balance("alice"), await gw.held("alice"), await gw.earnings())

        def same_answer(out_of_scope: tuple[int, Any], unknown: tuple[int, Any], real: str, made_up: str) -> None:
            """What a charge or hold outside the token's servers gets is what one that does not exist gets."""
            assert out_of_scope[0] == unknown[0] == 404
            assert out_of_scope[1]["error"]["code"] == unknown[1]["error"]["code"] == "not_found"
            assert out_of_scope[1]["error"]["message"].replace(real, "?") == unknown[1]["error"]["message"].replace(
                made_up, "?"
            )

        idem = {"Idempotency-Key": "refund-1"}
        same_answer(
            await api(gw, "POST", f"/v1/charges/{charge.id}/refund", tools_token, {}, **idem),
            await api(gw, "POST", "/v1/charges/ch_made_up/refund", tools_token, {}, **idem),
            charge.id,
            "ch_made_up",
        )
        for action in ("capture", "release"):
            same_answer(
                await api(gw, "POST", f"/v1/holds/{held.id}/{action}", tools_token, {}),
                await api(gw, "POST", f"/v1/holds/svc_made_up/{action}", tools_token, {}),
                held.id,
                "svc_made_up",
            )
        assert (await gw.balance("alice"), await gw.held("alice"), await gw.earnings()) == before
        assert (await gw.ledger.get_charge(charge.id)).refunded == 0
        assert (await gw.ledger.get_hold(held.id)).state == "pending"

        async with AgentPay(base_url(gw), maps_token) as maps:  # the token of that server still can
            assert (await maps.refund(charge.id)).amount_cents == Decimal("5")
            assert (await maps.capture(held.id)).amount_cents == Decimal("3")
        assert await gw.balance("alice") == parse_cents("97")
        await gw.verify_clean()


async def test_a_second_capture_of_a_captured_hold_replays_the_original_charge(config: Path) -> None:
    async with run_gateway(config) as gw:
        key, token = await setup(gw)
        async with AgentPay(base_url(gw), token) as pay:
            held = await pay.hold(key, "10", "render")
        path = f"/v1/holds/{held.id}/capture"
        first = await api(gw, "POST", path, token, {"amount_cents": "4"})
        again = await api(gw, "POST", path, token, {"amount_cents": "4"})
        bare = await api(gw, "POST", path, token, {})  # no amount: whatever the capture was
        assert first[0] == again[0] == bare[0] == 200
        assert first[1]["replayed"] is False and first[1]["amount_cents"] == "4"
        assert again[1] == bare[1] == {**first[1], "replayed": True}  # the original charge, balance after included
        other = await api(gw, "POST", path, token, {"amount_cents": "5"})
        assert other[0] == 409 and other[1]["error"]["code"] == "idempotency_conflict"
        async with AgentPay(base_url(gw), token) as pay:
            receipt = await pay.capture(held.id)
        assert (receipt.id, receipt.amount_cents, receipt.replayed) == (first[1]["id"], Decimal("4"), True)
        assert await gw.balance("alice") == parse_cents("96")
        assert await gw.earnings() == parse_cents("4")
        await gw.verify_clean()


async def test_a_token_scoped_to_one_server_lists_only_that_servers_charges_and_features(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"tools": None, "maps": None}, {})  # both servers belong to acme
    async with run_gateway(config) as gw:
        tools_key, tools_token = await setup(gw)
        maps_key = str((await gw.ops.create_key(user="alice", server="maps"))["key"])
        maps_token = str((await gw.ops.create_token(developer="acme", servers=["maps"]))["token"])
        async with AgentPay(base_url(gw), tools_token) as tools, AgentPay(base_url(gw), maps_token) as maps:
            tool_charges = [(await tools.charge(tools_key, "1", "search")).id for _ in range(3)]
            map_charges = [(await maps.charge(maps_key, "2", "route")).id for _ in range(3)]
        seen: list[str] = []
        cursor: str | None = None
        while True:  # pages of two: the cursor walks the token's servers only
            query = "/v1/charges?limit=2" + (f"&before={cursor}" if cursor else "")
            status, body = await api(gw, "GET", query, maps_token)
            assert status == 200
            assert {c["server"] for c in body["charges"]} <= {"maps"}
            seen += [c["id"] for c in body["charges"]]
            cursor = body["next"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(map_charges)
        status, body = await api(gw, "GET", f"/v1/charges?before={tool_charges[-1]}", maps_token)
        assert status == 400  # another server's charge is no cursor here: nothing to learn from it
        status, body = await api(gw, "GET", "/v1/earnings", maps_token)
        assert status == 200 and {f["server"] for f in body["by_feature"]} == {"maps"}


async def test_a_page_size_in_digits_other_than_ascii_is_refused(config: Path) -> None:
    async with run_gateway(config) as gw:
        _, token = await setup(gw)
        for limit in ("\uff15\uff10", "\u0665", "%205"):  # fullwidth 50, Arabic-Indic 5, " 5"
            status, body = await api(gw, "GET", f"/v1/charges?limit={limit}", token)
            assert status == 400 and body["error"]["code"] == "invalid_input", limit
