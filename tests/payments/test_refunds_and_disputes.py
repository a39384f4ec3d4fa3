"""Refunds and disputes take the credit back, even after it was spent: per-refund idempotent
clawbacks that sum to Stripe's amount_refunded whatever the order and repetition of events, and a
negative balance that refuses every priced call (through the real proxy) until a dispute is won."""

from __future__ import annotations

from pathlib import Path

from gateway.ledger.base import AccountKind
from tests.harness import mcp_client
from tests.payments.conftest import pay_gateway
from tests.payments.fake_stripe import FakeStripe
from tests.upstream_sdk import RunningUpstream


async def test_partial_refunds_sum_correctly_whatever_repeats(
    tmp_path: Path, fake_stripe: FakeStripe, database: str
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, database=database) as pg:
        await pg.user("alice")
        topup_id, completed = await pg.paid_topup("alice", 1000)
        await pg.deliver(completed)
        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])

        first = fake_stripe.refund(charge["id"], 300)
        second = fake_stripe.refund(charge["id"], 200)
        assert (await pg.deliver(second))[1]["outcome"] == "clawed_back 500"  # lists both refunds
        assert (await pg.deliver(first))[1]["outcome"] == "replayed"
        assert (await pg.deliver(second))[1]["outcome"] == "replayed"
        assert await pg.available_cents("alice") == 500
        topup = await pg.payments.store.topup(topup_id)
        assert topup is not None and (topup.state, topup.refunded_cents) == ("credited", 500)

        rest = fake_stripe.refund(charge["id"], 500)
        assert (await pg.deliver(rest))[1]["outcome"] == "clawed_back 500"
        assert await pg.available_cents("alice") == 0
        topup = await pg.payments.store.topup(topup_id)
        assert topup is not None and (topup.state, topup.refunded_cents) == ("refunded", 1000)
        await pg.verify_clean()


async def test_a_refund_that_arrives_before_the_checkout_completion_sums_correctly(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        topup_id, completed = await pg.paid_topup("alice", 1000)
        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])
        refunded = fake_stripe.refund(charge["id"], 400)

        assert (await pg.deliver(refunded))[1]["outcome"] == "clawed_back 400"  # credited first, then debited
        assert await pg.available_cents("alice") == 600
        assert (await pg.deliver(completed))[1]["outcome"] == "replayed"
        assert await pg.available_cents("alice") == 600
        topup = await pg.payments.store.topup(topup_id)
        assert topup is not None and topup.state == "credited"
        await pg.verify_clean()


async def test_a_dispute_lost_after_the_credit_was_spent_refuses_calls_until_it_is_won(
    tmp_path: Path, fake_stripe: FakeStripe, sdk_upstream: RunningUpstream
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, upstream=sdk_upstream.url) as pg:
        key = await pg.gw.new_user("alice", "0")
        _, completed = await pg.paid_topup("alice", 500)
        await pg.deliver(completed)
        async with mcp_client(pg.gw.url(), key) as client:
            for _ in range(60):  # 60 calls at 5 cents spend 300 of the 500
                assert not (await client.call_tool("get_forecast", {"city": "Oslo"})).is_error
        await pg.gw.settled()
        assert await pg.available_cents("alice") == 200

        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])
        lost = fake_stripe.dispute(charge["id"], "funds_withdrawn", dispute_id="dp_test_1")
        assert (await pg.deliver(lost))[1]["outcome"] == "clawed_back"
        assert (await pg.deliver(lost))[1]["outcome"] == "replayed"
        assert await pg.available_cents("alice") == -300
        await pg.verify_clean()

        async with mcp_client(pg.gw.url(), key) as client:
            refused = await client.call_tool("get_forecast", {"city": "Oslo"})
        assert refused.is_error
        text = refused.content[0].text  # type: ignore[union-attr]
        assert "Payment required" in text and "-300" in text and "refunded or disputed" in text
        assert sdk_upstream.log.completed.count("get_forecast") == 60  # the refused call never ran upstream

        won = fake_stripe.dispute(charge["id"], "funds_reinstated", dispute_id="dp_test_1")
        assert (await pg.deliver(won))[1]["outcome"] == "reinstated"
        assert (await pg.deliver(won))[1]["outcome"] == "replayed"
        assert await pg.available_cents("alice") == 200
        async with mcp_client(pg.gw.url(), key) as client:
            assert not (await client.call_tool("get_forecast", {"city": "Oslo"})).is_error
        await pg.gw.settled()
        account = await pg.gw.ledger.get_account(AccountKind.USER, "alice")
        assert account.available == 195_000
        notices = [n.kind for n in await pg.payments.store.notices("alice")]
        assert "dispute" in notices
        await pg.verify_clean()


async def test_a_refund_that_failed_gives_the_money_back_in_whatever_order_the_events_arrive(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        _, completed = await pg.paid_topup("alice", 1000)
        await pg.deliver(completed)
        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])
        refunded = fake_stripe.refund(charge["id"], 300, status="pending")  # a snapshot listing it pending
        refund_id = refunded["data"]["object"]["refunds"]["data"][0]["id"]
        failed = fake_stripe.fail_refund(refund_id)

        assert (await pg.deliver(failed))[1]["outcome"] == "refund_failed_returned"
        assert (await pg.deliver(refunded))[1]["outcome"] == "replayed"
        assert (await pg.deliver(failed))[1]["outcome"] == "replayed"

        assert await pg.available_cents("alice") == 1000
        await pg.verify_clean()


async def test_an_event_that_cannot_be_applied_now_is_answered_500_so_stripe_delivers_it_again(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        _, completed = await pg.paid_topup("alice", 1000)
        charge = fake_stripe.charge_of_session(completed["data"]["object"]["id"])
        refunded = fake_stripe.refund(charge["id"], 100)
        intent = fake_stripe.intents.pop(charge["payment_intent"])  # Stripe cannot tell us whose it is now

        status, body = await pg.deliver(refunded)
        assert (status, body["received"]) == (500, False)
        assert await pg.available_cents("alice") == 0

        fake_stripe.intents[intent["id"]] = intent  # the retry succeeds
        assert (await pg.deliver(refunded))[1]["outcome"] == "clawed_back 100"
        assert await pg.available_cents("alice") == 900  # credited first (out of order), then refunded
        await pg.verify_clean()
