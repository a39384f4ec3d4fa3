"""The AgentPay SDK for MCP developers who integrate in code instead of behind the proxy.

Needs only aiohttp (and the standard library)::

    async with AgentPay("https://pay.example.com", service_token) as pay:
        info = await pay.validate(user_key)
        receipt = await pay.charge(user_key, "2.5", feature="search")

Amounts are cents as ``int``, ``Decimal`` or ``str`` (never ``float``). Every money call carries an
idempotency key (one is made when you pass none); the SDK's own retries on network errors reuse
it, so a retry can never charge twice. Pass your own key to make *your* retries safe too.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

import aiohttp

P = ParamSpec("P")
R = TypeVar("R")


class AgentPayError(Exception):
    """An error answered by AgentPay: ``code`` is stable, ``message`` is for humans."""

    def __init__(self, code: str, message: str, status: int, details: Mapping[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details = dict(details or {})


class InvalidKey(AgentPayError):
    """The user's API key is missing, unknown, expired, revoked or for another server."""


class InvalidServiceToken(AgentPayError):
    """The developer's service token is missing, unknown or revoked."""


class InsufficientBalance(AgentPayError):
    """The user cannot afford this amount (or the key's spending limit is reached)."""


class IdempotencyConflict(AgentPayError):
    """The idempotency key was used before with different parameters."""


class NotFound(AgentPayError):
    """No such charge or hold for this developer."""


_KEY_CODES = {"missing_key", "invalid_key", "expired_key", "revoked_key", "wrong_server"}


def _error_for(status: int, body: Any) -> AgentPayError:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    code = str(err.get("code", f"http_{status}"))
    message = str(err.get("message", "unexpected response"))
    details = err.get("details") if isinstance(err.get("details"), dict) else None
    cls: type[AgentPayError] = AgentPayError
    if code in _KEY_CODES:
        cls = InvalidKey
    elif code in ("invalid_service_token", "missing_service_token"):
        cls = InvalidServiceToken
    elif status == 402:
        cls = InsufficientBalance
    elif code == "idempotency_conflict":
        cls = IdempotencyConflict
    elif status == 404:
        cls = NotFound
    return cls(code, message, status, details)


def cents_text(amount: int | Decimal | str) -> str:
    """An amount of cents as exact text; floats are refused (0.1 is not exact in binary)."""
    if isinstance(amount, (bool, float)):
        raise TypeError("amounts must be int, Decimal or str cents, never float")
    if isinstance(amount, int):
        return str(amount)
    if isinstance(amount, Decimal):
        return format(amount, "f")
    if isinstance(amount, str):
        return amount.strip()
    raise TypeError(f"amount must be int, Decimal or str, not {type(amount).__name__}")


@dataclass(frozen=True, slots=True)
class KeyInfo:
    user: str
    server: str
    available_cents: Decimal
    key_prefix: str


@dataclass(frozen=True, slots=True)
class ChargeReceipt:
    id: str
    amount_cents: Decimal
    balance_cents: Decimal  # the user's available balance right after the charge
    user: str
    server: str
    feature: str
    replayed: bool  # True when this idempotency key had already charged (a capture: the hold was captured before)


@dataclass(frozen=True, slots=True)
class HoldReceipt:
    id: str
    amount_cents: Decimal
    available_cents: Decimal
    expires_at: str
    replayed: bool


@dataclass(frozen=True, slots=True)
class RefundReceipt:
    id: str
    charge_id: str
    amount_cents: Decimal
    replayed: bool


class AgentPay:
    """Async client of the AgentPay service API."""

    def __init__(
        self,
        base_url: str,
        service_token: str,
        *,
        timeout_s: float = 10.0,
        retries: int = 3,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._token = service_token
        self._retries = retries
        self._own_session = session is None
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def __aenter__(self) -> AgentPay:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop (the client may be built at import time).
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, idempotency_key: str | None = None
    ) -> Any:
        headers = {"Authorization": f"Bearer {self._token}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        last: Exception | None = None
        for attempt in range(self._retries + 1):
            try:
                async with self._http().request(method, self._base + path, json=body, headers=headers) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status >= 500 and idempotency_key is not None and attempt < self._retries:
                        last = _error_for(resp.status, data)
                    elif resp.status >= 400:
                        raise _error_for(resp.status, data)
                    else:
                        return data
            except (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError, TimeoutError) as exc:
                # Safe to retry: money calls carry the same idempotency key every time.
                if idempotency_key is None and method != "GET":
                    raise
                last = exc
            if attempt < self._retries:
                await asyncio.sleep(0.05 * 2**attempt)
        assert last is not None
        raise last

    async def validate(self, key: str, *, server: str | None = None) -> KeyInfo:
        data = await self._call("POST", "/v1/keys/validate", {"key": key, "server": server})
        return KeyInfo(data["user"], data["server"], Decimal(data["available_cents"]), data["key_prefix"])

    async def charge(
        self,
        key: str,
        amount_cents: int | Decimal | str,
        feature: str,
        *,
        idempotency_key: str | None = None,
        server: str | None = None,
    ) -> ChargeReceipt:
        body = {"key": key, "amount_cents": cents_text(amount_cents), "feature": feature, "server": server}
        data = await self._call("POST", "/v1/charges", body, idempotency_key=idempotency_key or uuid.uuid4().hex)
        return _charge(data)

    async def hold(
        self,
        key: str,
        amount_cents: int | Decimal | str,
        feature: str,
        *,
        idempotency_key: str | None = None,
        ttl_s: float = 300.0,
        server: str | None = None,
    ) -> HoldReceipt:
        body = {
            "key": key,
            "amount_cents": cents_text(amount_cents),
            "feature": feature,
            "ttl_s": ttl_s,
            "server": server,
        }
        data = await self._call("POST", "/v1/holds", body, idempotency_key=idempotency_key or uuid.uuid4().hex)
        return HoldReceipt(
            data["id"],
            Decimal(data["amount_cents"]),
            Decimal(data["available_cents"]),
            data["expires_at"],
            bool(data.get("replayed")),
        )

    async def capture(self, hold_id: str, amount_cents: int | Decimal | str | None = None) -> ChargeReceipt:
        body = {} if amount_cents is None else {"amount_cents": cents_text(amount_cents)}
        data = await self._call("POST", f"/v1/holds/{hold_id}/capture", body, idempotency_key=hold_id)
        return _charge(data)

    async def release(self, hold_id: str) -> bool:
        data = await self._call("POST", f"/v1/holds/{hold_id}/release", {}, idempotency_key=hold_id)
        return bool(data["released"])

    async def refund(
        self, charge_id: str, amount_cents: int | Decimal | str | None = None, *, idempotency_key: str | None = None
    ) -> RefundReceipt:
        body = {} if amount_cents is None else {"amount_cents": cents_text(amount_cents)}
        data = await self._call(
            "POST", f"/v1/charges/{charge_id}/refund", body, idempotency_key=idempotency_key or uuid.uuid4().hex
        )
        return RefundReceipt(data["id"], data["charge_id"], Decimal(data["amount_cents"]), bool(data["replayed"]))

    async def charges(self, *, limit: int = 50, before: str | None = None) -> dict[str, Any]:
        query = f"?limit={limit}" + (f"&before={before}" if before else "")
        result: dict[str, Any] = await self._call("GET", "/v1/charges" + query)
        return result

    async def earnings(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/v1/earnings")
        return result


def _charge(data: dict[str, Any]) -> ChargeReceipt:
    return ChargeReceipt(
        data["id"],
        Decimal(data["amount_cents"]),
        Decimal(data["balance_cents"]),
        data["user"],
        data["server"],
        data["feature"],
        bool(data.get("replayed")),
    )
