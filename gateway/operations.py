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
from gateway.keys import API_KEY_PREFIX, display_prefix, generate_secret, hash_secret
from gateway.ledger.base import AccountKind, Charge, KeyRecord, Ledger
from gateway.money import AmountError, format_cents, parse_cents

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$")


def amount(text: object, what: str = "amount") -> int:
    try:
        return parse_cents(text)
    except AmountError as exc:
        raise InvalidInput(f"{what}: {exc}") from None


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
    ) -> dict[str, Any]:
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
            spend_limit=amount(spend_limit_cents, "spend limit") if spend_limit_cents is not None else None,
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

    async def verify(self) -> dict[str, Any]:
        violations = await self.ledger.verify()
        return {"ok": not violations, "violations": violations}
