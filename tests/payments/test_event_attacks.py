"""Events that try to move money the wrong way change the ledger at most once and never invent or
take money: a dispute reinstated that was never withdrawn, a PaymentIntent we never created naming
one of our top-ups, a session naming another user's top-up, another amount or a currency's case,
and replays after reconcile."""

from __future__ import annotations

import copy
from pathlib import Path

from tests.payments.conftest import pay_gateway
from tests.payments.fake_stripe import FakeStripe, fixture
from tests.payments.test_auto_recharge import saved_card_user, spend


async def test_a_dispute_reinstated_that_was_never_withdrawn_credits_nothing(
    tmp_path: Path, fake_stripe: FakeStripe, database: str
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, database=database) as pg:
        await pg.user("alice")
        _, completed = await pg.paid_topup("alice", 1000)
        await pg.deliver(completed)
        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])

        won = fake_stripe.dispute(charge["id"], "funds_reinstated", dispute_id="dp_only_won")
        assert (await pg.deliver(won))[1]["outcome"] == "reinstated"  # its withdrawal is made first
        assert (await pg.deliver(won))[1]["outcome"] == "replayed"
        assert await pg.available_cents("alice") == 1000  # not 2000: nothing was taken, nothing given

        lost = fake_stripe.dispute(charge["id"], "funds_withdrawn", dispute_id="dp_only_won")
        assert (await pg.deliver(lost))[1]["outcome"] == "replayed"  # the late withdrawal, already made
        assert await pg.available_cents("alice") == 1000
        await pg.verify_clean()


async def test_a_payment_intent_we_never_created_naming_a_recharge_top_up_credits_nothing(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await saved_card_user(pg)
        await spend(pg, 600, "c1")  # 400 left: the auto-recharge starts
        succeeded = next(e for e in fake_stripe.events if e["type"] == "payment_intent.succeeded")
        assert (await pg.deliver(succeeded))[1]["outcome"] == "credited"
        assert await pg.available_cents("alice") == 1400

        # Another PaymentIntent on the account (not made by us) carrying a copy of its metadata.
        ours = succeeded["data"]["object"]
        stranger = copy.deepcopy(fake_stripe.intents[ours["id"]])
        stranger["id"] = fake_stripe.new_id("pi")
        fake_stripe.intents[stranger["id"]] = stranger
        foreign_charge = fake_stripe._charge_for(stranger)
        event = fake_stripe.record("payment_intent.succeeded", stranger)
        assert (await pg.deliver(event))[1]["outcome"] == "ignored"
        assert await pg.available_cents("alice") == 1400  # the top-up was credited once, by its own intent

        # And its refund or dispute takes nothing from alice.
        refunded = fake_stripe.refund(foreign_charge["id"], 1000)
        assert (await pg.deliver(refunded))[1]["outcome"] == "unknown_charge"
        lost = fake_stripe.dispute(foreign_charge["id"], "funds_withdrawn")
        assert (await pg.deliver(lost))[1]["outcome"] == "unknown_charge"
        assert await pg.available_cents("alice") == 1400
        await pg.verify_clean()


async def test_a_session_naming_another_users_top_up_credits_only_its_own_top_up(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        await pg.user("mallory")
        alice_topup, alice_paid = await pg.paid_topup("alice", 1000)
        mallory_topup, mallory_paid = await pg.paid_topup("mallory", 500)
        # mallory's session claims alice's top-up as its client_reference_id
        forged = copy.deepcopy(mallory_paid)
        forged["id"] = fake_stripe.new_id("evt")
        forged["data"]["object"]["client_reference_id"] = alice_topup
        assert (await pg.deliver(forged))[1]["outcome"] == "credited"
        assert (await pg.available_cents("mallory"), await pg.available_cents("alice")) == (500, 0)
        assert (await pg.deliver(mallory_paid))[1]["outcome"] == "replayed"
        assert (await pg.deliver(alice_paid))[1]["outcome"] == "credited"
        assert (await pg.available_cents("mallory"), await pg.available_cents("alice")) == (500, 1000)
        topup = await pg.payments.store.topup(mallory_topup)
        assert topup is not None and topup.state == "credited"
        await pg.verify_clean()


async def test_a_session_paid_another_amount_or_in_upper_case_currency_credits_what_was_paid_once(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        _, completed = await pg.paid_topup("alice", 1000, currency="USD")
        completed["data"]["object"]["amount_total"] = 700  # e.g. a promotion code: 700 paid, not 1000
        assert (await pg.deliver(completed))[1]["outcome"] == "credited"
        changed = copy.deepcopy(completed)
        changed["id"] = fake_stripe.new_id("evt")
        changed["data"]["object"]["amount_total"] = 5000  # the same session again, another amount
        assert (await pg.deliver(changed))[1]["outcome"].startswith("refused")
        assert await pg.available_cents("alice") == 700
        await pg.verify_clean()


async def test_events_delivered_again_after_reconcile_change_nothing(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        _, completed = await pg.paid_topup("alice", 1000)
        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])
        refunded = fake_stripe.refund(charge["id"], 300)
        lost = fake_stripe.dispute(charge["id"], "funds_withdrawn", dispute_id="dp_r")
        won = fake_stripe.dispute(charge["id"], "funds_reinstated", dispute_id="dp_r")
        await pg.payments.reconcile(since_s=3600)
        assert await pg.available_cents("alice") == 700
        for event in (won, lost, refunded, completed, won):
            status, body = await pg.deliver(event)
            assert status == 200 and body["outcome"] == "replayed", body
        assert await pg.available_cents("alice") == 700
        await pg.verify_clean()


async def test_events_about_objects_we_never_made_change_nothing(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        _, completed = await pg.paid_topup("alice", 1000)
        await pg.deliver(completed)
        stranger = fixture(
            "payment_intent", id=fake_stripe.new_id("pi"), amount=5000, amount_received=5000, currency="usd",
            metadata={}, status="succeeded",
        )  # fmt: skip
        fake_stripe.intents[stranger["id"]] = stranger
        foreign_charge = fake_stripe._charge_for(stranger)
        account = fixture("account", id="acct_not_ours", payouts_enabled=True, metadata={})
        events = [
            fake_stripe.record("payment_intent.succeeded", stranger),
            fake_stripe.refund(foreign_charge["id"], 5000),
            fake_stripe.dispute(foreign_charge["id"], "funds_reinstated"),
            fake_stripe.record("account.updated", account),
        ]
        outcomes = [(await pg.deliver(event))[1]["outcome"] for event in events]
        assert outcomes == ["ignored", "unknown_charge", "unknown_charge", "unknown_account"]
        assert await pg.available_cents("alice") == 1000
        await pg.verify_clean()
