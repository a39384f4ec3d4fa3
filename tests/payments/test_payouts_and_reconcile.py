"""Developers paid by Connect transfers (success, failure, reversal), reconciliation finding a missed
event and applying it once, and the CLI's Stripe commands with their --json fields."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.ledger.base import HoldRequest, PayoutState
from gateway.ops.cli import main
from tests.harness import run_admin
from tests.payments.conftest import PayGateway, pay_gateway, stripe_section
from tests.payments.fake_stripe import FakeStripe


async def earn(pg: PayGateway, cents: int) -> None:
    """acme earns ``cents`` from alice's calls (topped up by hand: the payout side is under test)."""
    await pg.gw.ops.create_user("alice", str(cents))
    ledger = pg.gw.ledger
    await ledger.hold(HoldRequest("c1", None, "alice", "acme", "weather", "tools/call", "t", cents * 1000, 0, 30, "o"))
    await ledger.capture("c1")


async def connected(pg: PayGateway) -> str:
    link = await pg.payments.connect("acme")
    assert link["url"].startswith("https://connect.stripe.com/") and not link["payouts_enabled"]
    assert (await pg.deliver(pg.fake.enable_payouts(link["account_id"])))[1]["outcome"] == "payouts_enabled"
    return str(link["account_id"])


async def test_a_payout_is_a_transfer_keyed_by_the_payout_id_and_settles_with_its_id(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await earn(pg, 1234)
        account = await connected(pg)
        again = await pg.payments.connect("acme")
        assert again["account_id"] == account and len(fake_stripe.accounts) == 1

        result = await pg.payments.pay_out("acme")

        transfer = fake_stripe.transfers[result["transfer_id"]]
        assert (transfer["amount"], transfer["destination"], transfer["currency"]) == (1234, account, "usd")
        key = next(k for _, path, k, _ in fake_stripe.requests if path == "/v1/transfers")
        assert key == result["id"]  # Idempotency-Key = payout id
        assert (result["state"], result["reference"]) == ("settled", result["transfer_id"])
        assert await pg.gw.earnings() == 0
        await pg.verify_clean()


async def test_a_payout_started_through_the_admin_api_is_the_same_stripe_transfer_as_the_clis(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    """With payments.stripe configured, POST /v1/payouts pays by Connect transfer (as `agentpay
    payouts create` does) instead of leaving a pending payout for someone to settle by hand."""
    async with pay_gateway(tmp_path, fake_stripe) as pg, run_admin(pg.gw, "admin-token") as admin:
        await earn(pg, 900)

        async def post(body: dict[str, Any]) -> tuple[int, Any]:
            headers = {"Authorization": "Bearer admin-token"}
            async with aiohttp.ClientSession() as http:
                async with http.post(admin.make_url("/v1/payouts"), json=body, headers=headers) as resp:
                    return resp.status, await resp.json()

        status, refused = await post({"developer": "acme"})
        assert status == 409 and "no Stripe account" in refused["error"]["message"]
        assert await pg.gw.earnings() == 900_000 and not fake_stripe.transfers  # nothing moved

        account = await connected(pg)
        status, paid = await post({"developer": "acme", "amount_cents": "600"})

        assert status == 201 and (paid["state"], paid["transfer_state"]) == ("settled", "paid")
        transfer = fake_stripe.transfers[paid["transfer_id"]]
        assert (transfer["amount"], transfer["destination"]) == (600, account)
        assert paid["reference"] == paid["transfer_id"]
        assert await pg.gw.earnings() == 300_000
        await pg.verify_clean()


async def test_a_refused_transfer_returns_the_money_to_the_developer(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await earn(pg, 500)
        account = await connected(pg)
        fake_stripe.failing_destinations.add(account)

        result = await pg.payments.pay_out("acme")

        assert (result["state"], result["transfer_state"]) == ("failed", "failed")
        assert "insufficient" in result["detail"]
        assert await pg.gw.earnings() == 500_000
        await pg.verify_clean()


async def test_a_reversed_transfer_returns_the_money_once(
    tmp_path: Path, fake_stripe: FakeStripe, database: str
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, database=database) as pg:
        await earn(pg, 800)
        await connected(pg)
        result = await pg.payments.pay_out("acme")
        reversed_event = fake_stripe.reverse_transfer(result["transfer_id"])

        assert (await pg.deliver(reversed_event))[1]["outcome"] == "payout_reversed"
        assert (await pg.deliver(reversed_event))[1]["outcome"] == "replayed"

        assert await pg.gw.earnings() == 800_000
        payout = (await pg.gw.ledger.list_payouts("acme"))[0]
        assert payout.state is PayoutState.SETTLED
        await pg.verify_clean()


async def test_a_payout_waits_for_onboarding(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await earn(pg, 100)
        await pg.payments.connect("acme")
        with pytest.raises(Exception, match="not finished Stripe onboarding"):
            await pg.payments.pay_out("acme")
        assert await pg.gw.earnings() == 100_000


async def test_reconcile_applies_a_missed_event_once_and_reports_it(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        delivered_id, delivered = await pg.paid_topup("alice", 700)
        await pg.deliver(delivered)
        missed_id, _missed = await pg.paid_topup("alice", 900)  # its webhook never arrives

        report = await pg.payments.reconcile(72 * 3600)
        again = await pg.payments.reconcile(72 * 3600)

        assert [m["outcome"] for m in report["missed"]] == ["credited"]
        assert again["missed"] == [] and all(a["outcome"] in ("replayed", "ignored") for a in again["applied"])
        assert await pg.available_cents("alice") == 1600
        states = {t.id: t.state for t in await pg.payments.store.topups("alice")}
        assert states == {delivered_id: "credited", missed_id: "credited"}
        await pg.verify_clean()


def write_cli_config(pg: PayGateway) -> Path:
    path = pg.gw.config_path
    config: dict[str, Any] = yaml.safe_load(path.read_text())
    config["database"] = pg.gw.rt.config.database
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, json.loads(out.out) if code == 0 else out.err


async def test_the_cli_prints_a_topup_link_connects_a_developer_and_reconciles(
    tmp_path: Path, fake_stripe: FakeStripe, capsys: pytest.CaptureFixture[str]
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        config = str(write_cli_config(pg))

        code, link = await cli(capsys, "--config", config, "users", "topup-link", "alice", "1500", "--json")
        assert code == 0 and set(link) == {"topup_id", "session_id", "url"}
        assert fake_stripe.sessions[link["session_id"]]["client_reference_id"] == link["topup_id"]

        code, connect = await cli(capsys, "--config", config, "developers", "connect", "acme", "--json")
        assert code == 0 and connect["account_id"] in fake_stripe.accounts and connect["url"]

        fake_stripe.pay_session(link["session_id"])
        code, report = await cli(capsys, "--config", config, "payments", "reconcile", "--since", "1h", "--json")
        assert code == 0 and [m["outcome"] for m in report["missed"]] == ["credited"]

        code, shown = await cli(capsys, "--config", config, "users", "show", "alice", "--json")
        assert code == 0 and shown["available_cents"] == "1500"
        assert [(t["topup_id"], t["state"]) for t in shown["topups"]] == [(link["topup_id"], "credited")]

        code, err = await cli(capsys, "--config", config, "users", "topup-link", "alice", "12.5")
        assert code == 1 and "whole cents" in err

        await pg.deliver(fake_stripe.enable_payouts(connect["account_id"]))
        await pg.gw.ledger.hold(
            HoldRequest("c9", None, "alice", "acme", "weather", "tools/call", "t", 700_000, 0, 30, "o")
        )
        await pg.gw.ledger.capture("c9")
        code, payout = await cli(capsys, "--config", config, "payouts", "create", "acme", "--json")
        assert code == 0 and payout["state"] == "settled" and payout["transfer_id"] in fake_stripe.transfers
        await pg.verify_clean()


async def test_the_payout_schedule_pays_connected_developers_whose_earnings_reach_the_minimum(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    payments = {**stripe_section(fake_stripe), "payout_schedule": {"interval_s": 3600, "minimum_cents": 1000}}
    async with pay_gateway(tmp_path, fake_stripe, payments=payments) as pg:
        await earn(pg, 999)
        await connected(pg)
        assert await pg.payments.pay_out_all() == []  # under the minimum

        await pg.gw.ops.topup("alice", "1")
        await pg.gw.ledger.hold(
            HoldRequest("c2", None, "alice", "acme", "weather", "tools/call", "t", 1000, 0, 30, "o")
        )
        await pg.gw.ledger.capture("c2")
        paid = await pg.payments.pay_out_all()

        assert [(p["developer"], p["amount_cents"], p["state"]) for p in paid] == [("acme", "1000", "settled")]
        assert await pg.gw.earnings() == 0
        await pg.verify_clean()
