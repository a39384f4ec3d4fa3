"""Money in and out through Stripe (issue 16): card top-ups by Checkout, auto-recharge, refunds and
disputes clawed back, balance alerts, developer payouts by Connect transfers, and reconciliation.

Provider records live in their own tables (``store``); money moves only through the ledger, whose
references deduplicate every credit and clawback in the transaction that makes it. Modules:
``stripe_api`` (the calls to Stripe), ``signature`` (webhook signatures), ``handlers`` (one per event
type), ``topups``, ``recharge`` (auto-recharge and balance alerts), ``payouts``, ``reconcile``,
``service`` (``Payments``, all of them), ``webhook`` (the aiohttp handler, the only HTTP piece).
Importing this package has no side effects.
"""

from __future__ import annotations

from gateway.payments.service import Payments, build_payments

__all__ = ["Payments", "build_payments"]
