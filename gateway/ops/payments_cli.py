"""The CLI's Stripe commands (issue 16), each through the same ``Payments`` the gateway runs:

agentpay users topup-link NAME CENTS [--json]     {"topup_id", "session_id", "url"}
agentpay developers connect NAME [--json]         {"developer", "account_id", "url", "payouts_enabled"}
agentpay payments reconcile [--since 72h] [--json]
agentpay payouts create DEV                        with payments.stripe: also the Stripe transfer
agentpay users show NAME                           with payments.stripe: also the user's top-ups
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any

import structlog

from gateway.api.operations import Operations
from gateway.config import GatewayConfig
from gateway.errors import InvalidInput, PaymentsNotConfigured
from gateway.ledger import open_ledger
from gateway.money import parse_cents
from gateway.payments import Payments, build_payments

_DURATION = re.compile(r"^([0-9]+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_commands(command: Callable[..., argparse.ArgumentParser], commands: Any, users: Any, developers: Any) -> None:
    link = command("topup-link", "a Stripe Checkout link that adds CENTS to the user's balance once paid", users)
    link.add_argument("name")
    link.add_argument("cents", help="whole cents, within payments.stripe.min_topup_cents and max_topup_cents")
    command("connect", "a Stripe Express account and an onboarding link for the developer", developers).add_argument(
        "name"
    )
    payments = command("payments", "Stripe payments").add_subparsers(dest="action", required=True)
    reconcile = command("reconcile", "apply Stripe events that never arrived; report what differs", payments)
    reconcile.add_argument("--since", default="72h", help="the window: 30m, 72h, 7d (default 72h; Stripe keeps 30d)")


def parse_since(text: str) -> float:
    match = _DURATION.match(text.strip())
    if match is None:
        raise InvalidInput(f"--since must be a duration such as 30m, 72h or 7d, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def handles(args: argparse.Namespace, config: GatewayConfig) -> bool:
    """Whether this module runs the command (the Stripe ones; payouts create and users show only
    when Stripe is configured)."""
    key = (args.command, getattr(args, "action", None))
    if key in {("users", "topup-link"), ("developers", "connect"), ("payments", "reconcile")}:
        return True
    return config.payments.stripe is not None and key in {("payouts", "create"), ("users", "show")}


class _Stderr:
    """sys.stderr as it is at each write (a test may swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


async def run(config: GatewayConfig, args: argparse.Namespace) -> Any:
    if not structlog.is_configured():  # warnings (a missed event, a refused transfer) on stderr: --json stays JSON
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_Stderr()))  # type: ignore[arg-type]
    ledger = open_ledger(config.database)
    await ledger.open()
    payments = build_payments(config, ledger)
    try:
        if payments is None:
            raise PaymentsNotConfigured(f"`{args.command} {args.action}` needs payments.stripe in {config.path}")
        await payments.open()
        return await _dispatch(payments, Operations(ledger, config), args)
    finally:
        if payments is not None:
            await payments.close()
        await ledger.close()


async def _dispatch(payments: Payments, ops: Operations, args: argparse.Namespace) -> Any:
    key = (args.command, args.action)
    if key == ("users", "topup-link"):
        cents = parse_cents(args.cents)
        if cents % 1000:
            raise InvalidInput(f"a card top-up is whole cents, got {args.cents!r}")
        return (await payments.create_topup_link(args.name, cents // 1000)).to_json()
    if key == ("developers", "connect"):
        return await payments.connect(args.name)
    if key == ("payments", "reconcile"):
        return await payments.reconcile(parse_since(args.since))
    if key == ("payouts", "create"):
        amount = parse_cents(args.amount_cents) if args.amount_cents else None
        return await payments.pay_out(args.developer, amount)
    shown = await ops.show_user(args.name)
    shown["topups"] = [t.to_json() for t in await payments.store.topups(args.name)]
    return shown
