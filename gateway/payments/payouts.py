"""Developers paid with Stripe Connect: an Express account and its onboarding link per developer,
and a transfer per payout.

``pay_out`` moves earnings to payout clearing as ``payouts create`` always did (``Payouts.create_payout``),
then creates ``POST /v1/transfers`` with the payout id as the Idempotency-Key: success settles the payout
with the transfer id as its reference; a refusal returns the money (``fail_payout``). A transfer
reversed later (``transfer.reversed``) returns it too (``reverse_payout``: the payout was settled). A
crash between the two leaves the payout pending with its transfer record ``created``: ``payments
reconcile`` re-sends the transfer with the same Idempotency-Key, so it is made at most once.
Transfers are in whole cents: earnings' fractions of a cent stay with the developer.
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog

from gateway.errors import Conflict, InvalidInput, PaymentProviderError
from gateway.ledger.base import AccountKind, Payout, PayoutState
from gateway.money import MILLIS_PER_CENT, format_cents
from gateway.payments.core import PaymentsCore, object_id

log = structlog.get_logger("gateway.payments")


class PayoutsMixin(PaymentsCore):
    async def connect(self, developer: str) -> dict[str, Any]:
        """The developer's Express account (created once) and a fresh onboarding link."""
        await self.ledger.get_account(AccountKind.DEVELOPER, developer)
        known = await self.store.account(developer)
        if known is not None:
            account_id, enabled = known.account_id, known.payouts_enabled
        else:
            created = await self.api.create_account(developer, idempotency_key=f"account:{developer}")
            account_id = await self.store.remember_account(developer, str(created["id"]))
            enabled = False
        link = await self.api.create_account_link(
            account_id,
            refresh_url=f"{self.base_url}/portal/developer/connect",
            return_url=f"{self.base_url}/portal/developer",
            idempotency_key=f"account_link:{developer}:{uuid.uuid4().hex}",
        )
        return {"developer": developer, "account_id": account_id, "url": str(link["url"]), "payouts_enabled": enabled}

    async def pay_out(self, developer: str, amount: int | None = None) -> dict[str, Any]:
        """A payout by transfer (``amount`` in millicents, whole cents; None: all whole cents earned)."""
        account = await self.store.account(developer)
        if account is None:
            raise Conflict(
                f"developer {developer!r} has no Stripe account",
                hint=f"Run `agentpay developers connect {developer}` and finish the onboarding first",
            )
        if not account.payouts_enabled:
            raise Conflict(
                f"developer {developer!r} has not finished Stripe onboarding (payouts are not enabled yet)",
                hint=f"Open a new link with `agentpay developers connect {developer}`",
            )
        if amount is None:
            earned = (await self.ledger.earnings(developer)).earnings
            amount = earned - earned % MILLIS_PER_CENT
            if amount <= 0:
                raise InvalidInput(f"developer {developer!r} has no whole cent of earnings to pay out")
        elif amount % MILLIS_PER_CENT:
            raise InvalidInput(f"a payout by transfer must be whole cents, got {format_cents(amount)}")
        payout = await self.ledger.create_payout(developer, amount)
        await self.store.create_payout_transfer(payout.id, developer, account.account_id, amount // MILLIS_PER_CENT)
        return await self.send_transfer(payout.id)

    async def send_transfer(self, payout_id: str) -> dict[str, Any]:
        """Create (or, after a crash, re-create: same Idempotency-Key) a pending payout's transfer."""
        record = await self.store.payout_transfer(payout_id=payout_id)
        if record is None:
            raise InvalidInput(f"payout {payout_id} has no Stripe transfer record")
        try:
            transfer = await self.api.create_transfer(
                {
                    "amount": record.amount_cents,
                    "currency": self.config.currency,
                    "destination": record.account_id,
                    "transfer_group": payout_id,
                    "metadata": {"agentpay_payout": payout_id, "agentpay_developer": record.developer},
                },
                idempotency_key=payout_id,
            )
        except PaymentProviderError as exc:
            if exc.data.get("outcome_unknown"):  # maybe made: stays pending; reconcile re-sends the same key
                log.warning("payments_transfer_unknown", payout=payout_id, error=exc.message)
                pending = {p.id: p for p in await self.ledger.list_payouts(record.developer)}[payout_id]
                return {
                    **_payout_json(pending),
                    "transfer_id": None,
                    "transfer_state": "unknown",
                    "detail": exc.message,
                }
            failed = await self.ledger.fail_payout(payout_id)
            await self.store.set_payout_transfer(payout_id, "failed", detail=exc.message)
            log.warning("payments_transfer_failed", payout=payout_id, error=exc.message)
            return {**_payout_json(failed), "transfer_id": None, "transfer_state": "failed", "detail": exc.message}
        transfer_id = str(transfer["id"])
        settled = await self.ledger.settle_payout(payout_id, transfer_id)
        await self.store.set_payout_transfer(payout_id, "paid", transfer_id=transfer_id)
        return {**_payout_json(settled), "transfer_id": transfer_id, "transfer_state": "paid", "detail": None}

    async def transfer_reversed(self, transfer: dict[str, Any]) -> str:
        transfer_id = object_id(transfer)
        record = await self.store.payout_transfer(transfer_id=transfer_id) if transfer_id else None
        if record is None:
            metadata = transfer.get("metadata") if isinstance(transfer.get("metadata"), dict) else {}
            payout_id = metadata.get("agentpay_payout") if metadata else None
            record = await self.store.payout_transfer(payout_id=payout_id) if isinstance(payout_id, str) else None
        if record is None:
            return "unknown_transfer"
        amount = transfer.get("amount")
        reversed_amount = transfer.get("amount_reversed")
        if transfer.get("reversed") is not True and reversed_amount != amount:
            log.warning("payments_partial_reversal", payout=record.payout_id, amount_reversed=reversed_amount)
            return "partial_reversal_reported"
        payouts = {p.id: p for p in await self.ledger.list_payouts(record.developer)}
        payout = payouts.get(record.payout_id)
        if payout is None:
            return "unknown_payout"
        if payout.state is PayoutState.PENDING:
            await self.ledger.fail_payout(payout.id)
            outcome = "payout_failed"
        elif payout.state is PayoutState.SETTLED:
            reversal = await self.ledger.reverse_payout(payout.id)
            outcome = "replayed" if reversal.replayed else "payout_reversed"
        else:
            outcome = "replayed"
        await self.store.set_payout_transfer(record.payout_id, "reversed", detail="transfer reversed at Stripe")
        return outcome

    async def pay_out_all(self) -> list[dict[str, Any]]:
        """``payments.payout_schedule``: pay every connected developer whose earnings reach the minimum."""
        if self.schedule is None:
            return []
        results: list[dict[str, Any]] = []
        for developer in sorted(await self.ledger.developer_names()):
            account = await self.store.account(developer)
            if account is None or not account.payouts_enabled:
                continue
            earned = (await self.ledger.earnings(developer)).earnings
            if earned < self.schedule.minimum_cents * MILLIS_PER_CENT:
                continue
            try:
                results.append(await self.pay_out(developer))
            except (Conflict, InvalidInput, PaymentProviderError) as exc:
                log.warning("payments_scheduled_payout_failed", developer=developer, error=exc.message)
        return results


def _payout_json(payout: Payout) -> dict[str, Any]:
    return {
        "id": payout.id,
        "developer": payout.developer,
        "amount_cents": format_cents(payout.amount),
        "state": payout.state.value,
        "reference": payout.reference,
    }
