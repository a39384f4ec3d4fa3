"""Auto-recharge and balance alerts, triggered by real captures (``Billing.settle`` →
``Payments.on_capture``): one off-session PaymentIntent on the saved card, credited by its webhook;
declines and authentication pause it and tell the user; never two attempts in flight; three failures
switch it off; one alert per crossing below the threshold."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.ledger.base import HoldRequest
from tests.payments.conftest import PayGateway, pay_gateway
from tests.payments.fake_stripe import FakeStripe

CARD = "pm_card_visa"


async def saved_card_user(pg: PayGateway, *, threshold: int = 500, amount: int = 1000, cap: int = 5000) -> None:
    """alice, auto-recharge on, 1000 cents paid by a card saved for later (setup_future_usage)."""
    await pg.user("alice")
    await pg.payments.set_recharge(
        "alice", enabled=True, threshold_cents=threshold, amount_cents=amount, monthly_cap_cents=cap
    )
    _, completed = await pg.paid_topup("alice", 1000, card=CARD)
    assert completed["data"]["object"]["id"] in pg.fake.sessions
    await pg.deliver(completed)
    assert (await pg.payments.store.customer("alice")) is not None
    assert (await pg.payments.store.customer("alice"))[1] == CARD  # type: ignore[index]


async def spend(pg: PayGateway, cents: int, call_id: str) -> None:
    """A priced call captured through the gateway's own billing (the auto-recharge trigger point)."""
    billing = pg.gw.rt.billing
    outcome = await billing.hold(
        HoldRequest(
            call_id,
            None,
            "alice",
            "acme",
            "weather",
            "tools/call",
            "get_forecast",
            cents * 1000,
            0,
            30.0,
            billing.owner,
        )
    )
    assert outcome.ok
    await asyncio.shield(billing.settle(call_id, capture=True))
    await pg.payments.wait_checks()


def intents_created(fake: FakeStripe) -> list[str | None]:
    return [key for method, path, key, _ in fake.requests if path == "/v1/payment_intents"]


async def test_auto_recharge_charges_the_saved_card_once_and_is_credited_by_the_webhook(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg)
        await spend(pg, 400, "c1")  # 600 left: above the 500 threshold
        assert intents_created(fake_stripe) == []

        await spend(pg, 200, "c2")  # 400 left: under it
        keys = intents_created(fake_stripe)
        assert len(keys) == 1 and keys[0] is not None and keys[0].startswith("recharge:tu_")
        params = next(p for _, path, _, p in fake_stripe.requests if path == "/v1/payment_intents")
        assert (params["confirm"], params["off_session"], params["payment_method"]) == ("true", "true", CARD)
        assert await pg.available_cents("alice") == 400  # credited only by the webhook

        succeeded = next(e for e in fake_stripe.events if e["type"] == "payment_intent.succeeded")
        assert (await pg.deliver(succeeded))[1]["outcome"] == "credited"
        assert (await pg.deliver(succeeded))[1]["outcome"] == "replayed"
        assert await pg.available_cents("alice") == 1400
        recharge = await pg.payments.store.recharge("alice")
        assert recharge is not None and recharge.inflight is None and recharge.failures == 0
        await pg.verify_clean()


async def test_a_declined_auto_recharge_pauses_it_and_tells_the_user(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg)
        fake_stripe.card_behaviour[CARD] = "card_declined"

        await spend(pg, 600, "c1")
        await spend(pg, 100, "c2")  # paused: no second attempt

        assert len(intents_created(fake_stripe)) == 1
        recharge = await pg.payments.store.recharge("alice")
        assert recharge is not None and recharge.paused_reason == "card_declined" and recharge.enabled
        notice = (await pg.payments.store.notices("alice"))[0]
        assert notice.kind == "auto_recharge" and "declined" in notice.message and "paused" in notice.message
        failed = next(e for e in fake_stripe.events if e["type"] == "payment_intent.payment_failed")
        assert (await pg.deliver(failed))[1]["outcome"] == "stale"  # already counted when Stripe answered
        assert await pg.available_cents("alice") == 300
        await pg.verify_clean()


async def test_an_auto_recharge_needing_authentication_pauses_and_says_why(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg)
        fake_stripe.card_behaviour[CARD] = "authentication_required"

        await spend(pg, 600, "c1")

        recharge = await pg.payments.store.recharge("alice")
        assert recharge is not None and recharge.paused_reason == "authentication_required"
        notice = (await pg.payments.store.notices("alice"))[0]
        assert "confirm payments" in notice.message and "Add to your balance" in notice.message
        topups = await pg.payments.store.topups("alice")
        assert topups[0].kind == "recharge" and topups[0].state == "failed"


async def test_three_failed_auto_recharges_switch_it_off(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg, threshold=2000)
        fake_stripe.card_behaviour[CARD] = "card_declined"
        outcomes = []
        for _ in range(3):
            outcomes.append(await pg.payments.check_balance("alice"))
            recharge = await pg.payments.store.recharge("alice")
            assert recharge is not None
            if recharge.enabled:  # the user resumes it by saving the settings, but failures count on
                await pg.payments.store._execute(  # lift only the pause, keep the count
                    "UPDATE stripe_recharge SET paused_reason = NULL WHERE user_name = ?", "alice"
                )
        assert outcomes == ["card_declined"] * 3
        recharge = await pg.payments.store.recharge("alice")
        assert recharge is not None and not recharge.enabled and recharge.failures == 3
        assert "switched off" in (await pg.payments.store.notices("alice"))[0].message
        assert await pg.payments.check_balance("alice") == "off"


async def test_auto_recharge_never_runs_twice_in_parallel(
    tmp_path: Path, fake_stripe: FakeStripe, database: str
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, database=database) as pg:
        await saved_card_user(pg, threshold=2000)

        outcomes = await asyncio.gather(*(pg.payments.check_balance("alice") for _ in range(10)))

        assert outcomes.count("started") == 1
        assert set(outcomes) == {"started", "in_flight"}
        assert len(intents_created(fake_stripe)) == 1
        assert await pg.payments.check_balance("alice") == "in_flight"  # until its webhook lands
        succeeded = next(e for e in fake_stripe.events if e["type"] == "payment_intent.succeeded")
        await pg.deliver(succeeded)
        assert await pg.available_cents("alice") == 2000
        await pg.verify_clean()


async def test_auto_recharge_stops_at_the_monthly_cap(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg, threshold=5000, amount=1000, cap=1500)
        assert await pg.payments.check_balance("alice") == "started"
        await pg.deliver(next(e for e in fake_stripe.events if e["type"] == "payment_intent.succeeded"))

        assert await pg.payments.check_balance("alice") == "monthly_cap"
        assert len(intents_created(fake_stripe)) == 1


async def test_a_balance_alert_fires_once_per_crossing_below_its_threshold(
    tmp_path: Path, fake_stripe: FakeStripe, database: str
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, database=database) as pg:
        await pg.user("alice")
        await pg.payments.set_alert("alice", 500)
        _, completed = await pg.paid_topup("alice", 1000)
        await pg.deliver(completed)

        await spend(pg, 300, "c1")  # 700: above
        await spend(pg, 300, "c2")  # 400: crosses below
        await spend(pg, 100, "c3")  # 300: still below, no second alert
        alerts = [n for n in await pg.payments.store.notices("alice") if n.kind == "balance_alert"]
        assert len(alerts) == 1 and "under the 500 cents" in alerts[0].message

        _, again = await pg.paid_topup("alice", 1000)
        await pg.deliver(again)  # 1300: re-armed
        await spend(pg, 900, "c4")  # 400: crosses again
        alerts = [n for n in await pg.payments.store.notices("alice") if n.kind == "balance_alert"]
        assert len(alerts) == 2
        await pg.verify_clean()


async def test_an_attempt_claimed_but_never_sent_to_stripe_is_released_after_an_hour(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg, threshold=2000)
        store = pg.payments.store
        await store.create_topup("tu_stuck", "alice", "recharge", 1000, "usd")
        assert await store.claim_recharge("alice", "tu_stuck")  # then the process stopped
        assert await pg.payments.check_balance("alice") == "in_flight"

        await store._execute("UPDATE stripe_recharge SET updated_at = updated_at - 3601 WHERE user_name = ?", "alice")

        assert await pg.payments.check_balance("alice") == "released"
        assert await pg.payments.check_balance("alice") == "started"
        assert len(intents_created(fake_stripe)) == 1


async def test_a_balance_alert_is_also_mailed_when_smtp_is_set(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    from aiosmtpd.controller import Controller

    from tests.process import free_port

    class Inbox:
        def __init__(self) -> None:
            self.mail: list[tuple[list[str], str]] = []

        async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
            self.mail.append((list(envelope.rcpt_tos), envelope.content.decode()))
            return "250 OK"

    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        smtp = {"host": "127.0.0.1", "port": port, "starttls": False, "from": "AgentPay <billing@example.com>"}
        async with pay_gateway(tmp_path, fake_stripe, smtp=smtp) as pg:
            await pg.gw.ops.create_user("ada@example.com", None)
            await pg.payments.set_alert("ada@example.com", 500)
            await pg.gw.ops.topup("ada@example.com", "600")
            assert await pg.payments.check_balance("ada@example.com") == "off"  # 600: above, nothing sent
            await pg.gw.ledger.clawback("ada@example.com", 200_000, "stripe:test:1")
            await pg.payments.check_balance("ada@example.com")
            await pg.payments.check_balance("ada@example.com")  # still below: no second mail
    finally:
        controller.stop()
    assert len(inbox.mail) == 1
    to, text = inbox.mail[0]
    assert to == ["ada@example.com"] and "Your AgentPay balance is low" in text and "400 cents" in text
