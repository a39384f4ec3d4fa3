"""``agentpay payments reconcile``: list Stripe's events of a window (``GET /v1/events``,
``created[gte]``), apply every handled one through the same idempotent handlers as the webhook
(one that did arrive is a no-op: the ledger's references replay), re-send transfers of payouts left
pending by a crash (same Idempotency-Key), and report what differs: events that had never been
seen, top-ups still waiting, top-ups refused for their currency. Safe to run at any time."""

from __future__ import annotations

from typing import Any

import structlog

from gateway.errors import GatewayError
from gateway.payments.handlers import HANDLED_EVENTS, Handlers

log = structlog.get_logger("gateway.payments")
RECONCILE_HANDLER = "reconcile"


class Reconciler(Handlers):
    async def reconcile(self, since_s: float) -> dict[str, Any]:
        now = self.clock()
        start = now - since_s
        seen = await self.store.seen_events(start - 86400)
        events = await self.api.list_events(int(start))
        applied: list[dict[str, Any]] = []
        missed: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for event in events:
            event_id, event_type = str(event.get("id")), str(event.get("type"))
            if event_type not in HANDLED_EVENTS:
                continue
            try:
                outcome = await self.apply_event(event)
            except GatewayError as exc:
                errors.append({"event_id": event_id, "type": event_type, "error": exc.text()})
                continue
            await self.store.log_event(RECONCILE_HANDLER, event_id, event_type, outcome)
            entry = {"event_id": event_id, "type": event_type, "outcome": outcome}
            applied.append(entry)
            if event_id not in seen:
                missed.append(entry)
                log.warning("payments_missed_event", event_id=event_id, type=event_type, outcome=outcome)
        resent: list[dict[str, Any]] = []
        for payout in await self.ledger.list_payouts():
            if payout.state.value != "pending":
                continue
            record = await self.store.payout_transfer(payout_id=payout.id)
            if record is not None and record.state == "created":
                resent.append(await self.send_transfer(payout.id))
        waiting: list[dict[str, Any]] = []
        refused: list[dict[str, Any]] = []
        for topup in await self.store.all_topups(start):
            if topup.state == "pending" and topup.created_at < now - 3600:
                waiting.append(topup.to_json())
            elif topup.state == "failed" and topup.detail and "not credited" in topup.detail:
                refused.append(topup.to_json())
        return {
            "since": start,
            "events": len(events),
            "applied": applied,
            "missed": missed,
            "errors": errors,
            "payouts_resent": resent,
            "topups_waiting": waiting,
            "topups_refused": refused,
        }
