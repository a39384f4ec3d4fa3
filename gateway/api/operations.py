"""Operator operations, shared by the CLI and (later) the admin HTTP API.

Each operation takes plain values (amounts as cent strings), validates them, calls the ledger, and
returns a JSON-ready dict where every amount is a ``*_cents`` decimal string.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.config import GatewayConfig
from gateway.errors import InvalidInput, NotFound
from gateway.keys import API_KEY_PREFIX, SERVICE_TOKEN_PREFIX, display_prefix, generate_secret, hash_secret
from gateway.ledger.base import (
    MAX_AMOUNT,
    PROVIDER_REFERENCE_PREFIX,
    AccountKind,
    Charge,
    KeyRecord,
    Payout,
    ServiceToken,
    StatementLine,
    operator_reference,
)
from gateway.ledger.interfaces import Ledger
from gateway.ledger.rows import amount_too_large, require_key_name
from gateway.money import AmountError, format_cents, parse_cents

_DURATION = re.compile(r"^([0-9]+)([smhdw])$")  # ASCII digits only: \d also takes fullwidth or Arabic-Indic ones
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def amount(text: object, what: str = "amount", *, moved: bool = True) -> int:
    """Cents as text → millicents. An amount to be ``moved`` (top-up, initial balance, refund, payout)
    is at most ``MAX_AMOUNT`` per request (AmountTooLarge, 422); a spending limit only caps."""
    try:
        value = parse_cents(text)
    except AmountError as exc:
        raise InvalidInput(f"{what}: {exc}") from None
    if moved and value > MAX_AMOUNT:
        raise amount_too_large(value, what)
    return value


def parse_expiry(text: str, now: float) -> float:
    """'30d', '12h', '2027-01-31' or an ISO datetime → unix seconds."""
    match = _DURATION.match(text.strip())
    if match:
        return now + int(match.group(1)) * _UNITS[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise InvalidInput(f"expiry {text!r} is not a duration (30d, 12h) or an ISO date (2027-01-31)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if when.timestamp() <= now:
        raise InvalidInput(f"expiry {text!r} is in the past")
    return when.timestamp()


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def key_json(key: KeyRecord) -> dict[str, Any]:
    return {
        "id": key.id,
        "prefix": key.prefix,
        "user": key.user,
        "server": key.server,
        "created_at": iso(key.created_at),
        "expires_at": iso(key.expires_at),
        "revoked_at": iso(key.revoked_at),
        "spend_limit_cents": None if key.spend_limit is None else format_cents(key.spend_limit),
        "spent_cents": format_cents(key.spent),
        "name": key.name,
        "last_used_at": iso(key.last_used_at),  # up to auth.LAST_USED_FLUSH_S behind; None: never used
    }


def charge_json(charge: Charge) -> dict[str, Any]:
    return {
        "id": charge.id,
        "user": charge.user,
        "server": charge.server,
        "method": charge.method,
        "name": charge.name,
        "amount_cents": format_cents(charge.amount),
        "fee_cents": format_cents(charge.fee),
        "refunded_cents": format_cents(charge.refunded),
        "created_at": iso(charge.created_at),
    }


def token_json(token: ServiceToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "prefix": token.prefix,
        "developer": token.developer,
        "servers": list(token.servers),
        "created_at": iso(token.created_at),
        "revoked_at": iso(token.revoked_at),
    }


def payout_json(payout: Payout) -> dict[str, Any]:
    return {
        "id": payout.id,
        "developer": payout.developer,
        "amount_cents": format_cents(payout.amount),
        "state": payout.state.value,
        "reference": payout.reference,
        "created_at": iso(payout.created_at),
        "completed_at": iso(payout.completed_at),
    }


def statement_json(line: StatementLine) -> dict[str, Any]:
    return {
        "transfer_id": line.transfer_id,
        "kind": line.kind,
        "amount_cents": format_cents(line.amount),
        "server": line.server,
        "name": line.name,
        "charge_id": line.charge_id,
        "created_at": iso(line.created_at),
    }


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(name):
        raise InvalidInput(f"{what} name {name!r} must be 1-128 letters, digits, '_', '.', '@' or '-'")
    return name


@dataclass(slots=True)
class Operations:
    ledger: Ledger
    config: GatewayConfig | None = None

    async def create_developer(self, name: str) -> dict[str, Any]:
        account = await self.ledger.create_developer(_check_name(name, "developer"))
        return {"developer": account.name, "earnings_cents": format_cents(account.balance)}

    async def create_user(self, name: str, balance_cents: str | None = None) -> dict[str, Any]:
        initial = amount(balance_cents, "balance") if balance_cents is not None else 0
        await self.ledger.create_user(_check_name(name, "user"))
        if initial:
            await self.ledger.topup(name, initial, reference=f"initial-balance:{name}")
        return await self.show_user(name)

    async def topup(self, name: str, cents: str, reference: str | None = None) -> dict[str, Any]:
        value = amount(cents)
        if value <= 0:
            raise InvalidInput("a top-up must be more than 0 cents")
        if reference is not None and reference.startswith(PROVIDER_REFERENCE_PREFIX):
            raise InvalidInput(
                f"top-up references starting with {PROVIDER_REFERENCE_PREFIX!r} are the payment provider's "
                "(its webhooks credit them once)",
                hint="Choose another reference",
            )
        transfer = await self.ledger.topup(name, value, reference=reference)
        account = await self.ledger.get_account(AccountKind.USER, name)
        return {
            "user": name,
            "transfer_id": transfer.id,
            "amount_cents": format_cents(transfer.amount),
            "reference": transfer.reference,
            "replayed": transfer.replayed,
            "balance_cents": format_cents(account.balance),
            "available_cents": format_cents(account.available),
        }

    async def show_user(self, name: str) -> dict[str, Any]:
        summary = await self.ledger.user_summary(name)
        return {
            "user": summary.user,
            "balance_cents": format_cents(summary.balance),
            "held_cents": format_cents(summary.held),
            "available_cents": format_cents(summary.available),
            "keys": [key_json(k) for k in summary.keys],
            "recent_charges": [charge_json(c) for c in summary.recent_charges],
        }

    async def create_key(
        self,
        *,
        user: str,
        server: str,
        expires: str | None = None,
        spend_limit_cents: str | None = None,
        name: str | None = None,
    ) -> dict[str, Any]:
        """A new key (its secret under "key", shown this once). ``name``: surrounding blanks dropped,
        blank is no name; the ledger refuses one over 100 characters or with control characters."""
        name = require_key_name((name.strip() or None) if isinstance(name, str) else name)
        if self.config is not None and server not in self.config.servers:
            known = ", ".join(sorted(self.config.servers)) or "none"
            raise NotFound(f"server {server!r} is not in the config (configured servers: {known})")
        await self.ledger.get_account(AccountKind.USER, user)
        secret = generate_secret(API_KEY_PREFIX)
        record = await self.ledger.create_key(
            user=user,
            server=server,
            key_hash=hash_secret(secret),
            prefix=display_prefix(secret),
            expires_at=parse_expiry(expires, time.time()) if expires else None,
            spend_limit=None if spend_limit_cents is None else amount(spend_limit_cents, "spend limit", moved=False),
            name=name,
        )
        return {**key_json(record), "key": secret}

    async def list_keys(self, user: str | None = None) -> list[dict[str, Any]]:
        return [key_json(k) for k in await self.ledger.list_keys(user)]

    async def revoke_key(self, id_or_prefix: str) -> dict[str, Any]:
        return key_json(await self.ledger.revoke_key(id_or_prefix))

    async def usage(self, user: str | None = None, server: str | None = None) -> list[dict[str, Any]]:
        return [
            {
                "user": row.user,
                "server": row.server,
                "method": row.method,
                "name": row.name,
                "calls": row.calls,
                "amount_cents": format_cents(row.amount),
            }
            for row in await self.ledger.usage(user=user, server=server)
        ]

    async def earnings(self, developer: str) -> dict[str, Any]:
        earned = await self.ledger.earnings(developer)
        return {
            "developer": earned.developer,
            "earnings_cents": format_cents(earned.earnings),
            "lifetime_cents": format_cents(earned.lifetime),
        }

    async def create_token(self, *, developer: str, servers: list[str]) -> dict[str, Any]:
        if not servers:
            raise InvalidInput("a service token needs at least one --server")
        if self.config is not None:
            for server in servers:
                if server not in self.config.servers:
                    raise NotFound(f"server {server!r} is not in the config")
                owner = self.config.servers[server].owner
                if owner != developer:
                    raise InvalidInput(f"server {server!r} belongs to developer {owner!r}, not {developer!r}")
        secret = generate_secret(SERVICE_TOKEN_PREFIX)
        token = await self.ledger.create_service_token(
            developer=developer, servers=servers, token_hash=hash_secret(secret), prefix=display_prefix(secret)
        )
        return {**token_json(token), "token": secret}

    async def list_tokens(self, developer: str | None = None) -> list[dict[str, Any]]:
        return [token_json(t) for t in await self.ledger.list_service_tokens(developer)]

    async def revoke_token(self, id_or_prefix: str) -> dict[str, Any]:
        return token_json(await self.ledger.revoke_service_token(id_or_prefix))

    async def refund(
        self, charge_id: str, amount_cents: str | None = None, reference: str | None = None
    ) -> dict[str, Any]:
        """Refund any charge as the operator. ``reference`` (the admin API's Idempotency-Key, the CLI's
        --reference) lives in the operator's namespace (``base.operator_reference``): a developer's
        service API key of the same text is another key."""
        value = amount(amount_cents, "refund amount") if amount_cents is not None else None
        stored = operator_reference(reference) if reference else None
        transfer = await self.ledger.refund(charge_id, value, reference=stored)
        charge = await self.ledger.get_charge(charge_id)
        return {
            "id": transfer.id,
            "charge_id": charge_id,
            "amount_cents": format_cents(transfer.amount),
            "refunded_cents": format_cents(charge.refunded),
            "replayed": transfer.replayed,
        }

    async def create_payout(self, developer: str, amount_cents: str | None = None) -> dict[str, Any]:
        value = amount(amount_cents, "payout amount") if amount_cents is not None else None
        return payout_json(await self.ledger.create_payout(developer, value))

    async def settle_payout(self, payout_id: str, reference: str) -> dict[str, Any]:
        if not reference.strip():
            raise InvalidInput("settling a payout needs --reference (the bank or transfer reference)")
        return payout_json(await self.ledger.settle_payout(payout_id, reference.strip()))

    async def fail_payout(self, payout_id: str) -> dict[str, Any]:
        return payout_json(await self.ledger.fail_payout(payout_id))

    async def list_payouts(self, developer: str | None = None) -> list[dict[str, Any]]:
        return [payout_json(p) for p in await self.ledger.list_payouts(developer)]

    async def statement(self, developer: str, limit: int = 1000) -> list[dict[str, Any]]:
        return [statement_json(line) for line in await self.ledger.statement(developer, limit=limit)]

    async def verify(self) -> dict[str, Any]:
        violations = await self.ledger.verify()
        return {"ok": not violations, "violations": violations}
