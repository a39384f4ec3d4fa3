"""The portal's billing page over a real gateway and a fake Stripe: "Add to balance" (``POST
/portal/topup``, field ``amount_cents``) answers 303 to the Checkout page, the success page says
"pending" until the webhook lands, auto-recharge and alert settings are saved, a negative balance is
explained, and a developer's Connect button leads to Stripe's onboarding."""

from __future__ import annotations

from pathlib import Path

from gateway.ledger.base import AccountKind
from tests.payments.conftest import stripe_section
from tests.payments.fake_stripe import FakeStripe
from tests.portal.harness import Visitor, run_portal


async def test_add_to_balance_redirects_to_checkout_and_the_balance_moves_only_when_the_webhook_lands(
    tmp_path: Path, fake_stripe: FakeStripe
) -> None:
    async with run_portal(tmp_path, {"weather": None}, payments=stripe_section(fake_stripe)) as portal:
        async with Visitor(portal) as browser:
            await browser.sign_up("ada@example.com")
            status, text, resp = await browser.get("/portal/billing")
            assert status == 200 and 'data-testid="topup-form"' in text
            assert "form-action 'self' https://checkout.stripe.com" in resp.headers["Content-Security-Policy"]

            assert (await browser.post("/portal/topup", {"amount_cents": "1500"}, csrf=""))[0] == 403
            status, _, resp = await browser.post("/portal/topup", {"amount_cents": "1500"})
            assert status == 303
            session = next(iter(fake_stripe.sessions.values()))
            assert resp.headers["Location"] == session["url"]
            topup_id = session["client_reference_id"]

            status, text, _ = await browser.get(f"/portal/topup/success?topup={topup_id}")
            assert status == 200 and 'data-state="pending"' in text
            rt = portal.gw.rt
            assert (await rt.ledger.get_account(AccountKind.USER, "ada@example.com")).available == 0

            webhook = portal.url("/payments/stripe/webhook")
            status_code, body = await fake_stripe.deliver(webhook, fake_stripe.pay_session(session["id"]))
            assert (status_code, body["outcome"]) == (200, "credited")
            status, text, _ = await browser.get(f"/portal/topup/success?topup={topup_id}")
            assert 'data-state="credited"' in text
            _, text, _ = await browser.get("/portal/billing")
            assert f'data-topup="{topup_id}" data-state="credited"' in text

            await browser.get("/portal/billing")
            status, _, _ = await browser.post(
                "/portal/billing/recharge",
                {"enabled": "on", "threshold_cents": "300", "amount_cents": "1000", "monthly_cap_cents": "5000"},
            )
            assert status == 303
            await browser.get("/portal/billing")
            assert (await browser.post("/portal/billing/alert", {"threshold_cents": "200"}))[0] == 303
            assert rt.payments is not None
            recharge = await rt.payments.store.recharge("ada@example.com")
            assert recharge is not None and (recharge.enabled, recharge.threshold_cents) == (True, 300)
            assert await rt.payments.store.alert("ada@example.com") == (200, True)

            charge = fake_stripe.charge_of_session(session["id"])
            await fake_stripe.deliver(webhook, fake_stripe.dispute(charge["id"], "funds_withdrawn"))
            await rt.ledger.clawback("ada@example.com", 500_000, "stripe:test:extra")
            _, text, _ = await browser.get("/portal/billing")
            assert 'data-testid="negative-balance"' in text and "refunded or disputed" in text

            other = "/portal/topup/success?topup=tu_not_mine"
            assert (await browser.get(other))[0] == 404


async def test_a_developer_connects_a_stripe_account_from_the_portal(tmp_path: Path, fake_stripe: FakeStripe) -> None:
    async with run_portal(tmp_path, {"weather": None}, payments=stripe_section(fake_stripe)) as portal:
        async with Visitor(portal) as browser:
            await browser.sign_up("dev@example.com")
            await portal.gw.ops.create_developer("devco")
            invite = await portal.gw.rt.logins.invite("dev@example.com", developer="devco")
            assert invite.url
            await browser.post("/portal/logout")  # sign in again: the session now shows the developer account
            assert await browser.sign_in("dev@example.com") == 303
            _, text, _ = await browser.get("/portal/billing")
            assert 'data-testid="connect-form"' in text
            status, _, resp = await browser.post("/portal/developer/connect")
            assert status == 303 and resp.headers["Location"].startswith("https://connect.stripe.com/")
            assert len(fake_stripe.accounts) == 1
