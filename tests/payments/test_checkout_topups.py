"""Card top-ups through Stripe Checkout: the session AgentPay asks for, crediting only from verified
webhooks, exactly once, and the refusals (forged, stale, unsigned, another currency)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from gateway.errors import InvalidInput
from tests.payments.conftest import pay_gateway
from tests.payments.fake_stripe import FakeStripe


async def test_a_topup_link_creates_one_checkout_session_for_the_users_remembered_customer(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        first = await pg.payments.create_topup_link("alice", 1500)
        second = await pg.payments.create_topup_link("alice", 700)

        session = fake_stripe.sessions[first.session_id]
        assert session["mode"] == "payment" and session["amount_total"] == 1500 and session["currency"] == "usd"
        assert session["client_reference_id"] == first.topup_id
        assert first.url == session["url"]
        assert session["success_url"].endswith(f"/portal/topup/success?topup={first.topup_id}")
        assert len(fake_stripe.customers) == 1  # created once, remembered
        assert fake_stripe.sessions[second.session_id]["customer"] == session["customer"]
        keys = [key for method, path, key, _ in fake_stripe.requests if path == "/v1/checkout/sessions"]
        assert keys == [f"topup:{first.topup_id}", f"topup:{second.topup_id}"]
        assert all(key for _, _, key, _ in fake_stripe.requests)  # an Idempotency-Key on every POST

        topup = await pg.payments.store.topup(first.topup_id)
        assert topup is not None and topup.state == "pending"
        assert await pg.available_cents("alice") == 0  # nothing moves before the webhook


async def test_a_topup_outside_the_configured_range_is_refused(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        for cents in (499, 100001):
            try:
                await pg.payments.create_topup_link("alice", cents)
            except InvalidInput as exc:
                assert "from 500 to 100000" in exc.message
            else:
                raise AssertionError("out-of-range top-up accepted")
        assert fake_stripe.sessions == {}


async def test_a_checkout_is_credited_once_although_its_event_arrives_20_times_at_once(
    tmp_path: Path, fake_stripe: FakeStripe, database: str
) -> None:
    async with pay_gateway(tmp_path, fake_stripe, database=database) as pg:
        await pg.user("alice")
        topup_id, completed = await pg.paid_topup("alice", 2500)

        async with aiohttp.ClientSession() as http:
            answers = await asyncio.gather(*(pg.deliver(completed, session=http) for _ in range(20)))

        assert [status for status, _ in answers] == [200] * 20
        outcomes = sorted(body["outcome"] for _, body in answers)
        assert outcomes.count("credited") == 1 and outcomes.count("replayed") == 19
        assert await pg.available_cents("alice") == 2500
        topup = await pg.payments.store.topup(topup_id)
        assert topup is not None and topup.state == "credited"
        await pg.verify_clean()


async def test_forged_stale_and_unsigned_events_are_refused_with_400_and_change_nothing(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        topup_id, completed = await pg.paid_topup("alice", 1000)

        forged = await pg.deliver(completed, secret="whsec_someone_else")
        stale = await pg.deliver(completed, timestamp=int(time.time()) - 301)
        unsigned = await pg.deliver(completed, header="")
        tampered_body = dict(completed, type="checkout.session.completed", id="evt_other")
        _, good_header = FakeStripe.signed(completed)
        tampered = await pg.deliver(tampered_body, header=good_header)

        for status, body in (forged, stale, unsigned, tampered):
            assert status == 400
            assert body["error"]["code"] == "webhook_signature_invalid"
        assert "stale" in stale[1]["error"]["message"]
        assert await pg.available_cents("alice") == 0
        topup = await pg.payments.store.topup(topup_id)
        assert topup is not None and topup.state == "pending"

        # a second v1 (a rolled secret) is accepted next to a wrong one
        _, header = FakeStripe.signed(completed)
        status, answer = await pg.deliver(completed, header=header.replace("v1=", "v1=00ff,v1="))
        assert (status, answer["outcome"]) == (200, "credited")
        await pg.verify_clean()


async def test_a_checkout_paid_in_another_currency_is_refused_and_reported_never_converted(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        topup_id, completed = await pg.paid_topup("alice", 1000, currency="eur")

        status, body = await pg.deliver(completed)

        assert (status, body["outcome"]) == (200, "refused_currency")
        assert await pg.available_cents("alice") == 0
        topup = await pg.payments.store.topup(topup_id)
        assert topup is not None and topup.state == "failed"
        assert topup.detail is not None and "eur" in topup.detail and "not credited" in topup.detail
        notices = await pg.payments.store.notices("alice")
        assert notices and notices[0].kind == "topup_refused"
        await pg.verify_clean()


async def test_a_delayed_payment_is_credited_only_when_it_succeeds_and_a_failed_one_never(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        late_id, late = await pg.paid_topup("alice", 1000, delayed=True)
        failing_id, failing = await pg.paid_topup("alice", 800, delayed=True)

        assert (await pg.deliver(late))[1]["outcome"] == "awaiting_payment"
        assert (await pg.deliver(failing))[1]["outcome"] == "awaiting_payment"
        assert await pg.available_cents("alice") == 0

        late_session = next(s for s in fake_stripe.sessions.values() if s["client_reference_id"] == late_id)
        failing_session = next(s for s in fake_stripe.sessions.values() if s["client_reference_id"] == failing_id)
        assert (await pg.deliver(fake_stripe.async_payment(late_session["id"], succeeded=True)))[1][
            "outcome"
        ] == "credited"
        assert (await pg.deliver(fake_stripe.async_payment(failing_session["id"], succeeded=False)))[1][
            "outcome"
        ] == "failed"

        assert await pg.available_cents("alice") == 1000
        states = {t.id: t.state for t in await pg.payments.store.topups("alice")}
        assert states == {late_id: "credited", failing_id: "failed"}
        await pg.verify_clean()


async def test_an_operator_top_up_reference_cannot_use_the_providers_namespace(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with pay_gateway(tmp_path, fake_stripe) as pg:
        await pg.user("alice")
        try:
            await pg.gw.ops.topup("alice", "100", reference="stripe:checkout:cs_test_x")
        except InvalidInput as exc:
            assert "payment provider" in exc.message
        else:
            raise AssertionError("a stripe: reference was accepted from the operator")
