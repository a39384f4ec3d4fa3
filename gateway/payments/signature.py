"""Checking a webhook's ``Stripe-Signature`` on the raw body, before anything parses it.

Header: ``t=<unix seconds>,v1=<hex>[,v1=<hex>...]`` (several v1 while a secret is being rolled;
other schemes such as v0 are ignored). The signed payload is ``"<t>.<raw body>"``, HMAC-SHA256 with
the endpoint's secret; any v1 may match, compared in constant time; a timestamp more than
``tolerance_s`` away from now is stale (a replayed capture of an old delivery). Every refusal is
``WebhookSignatureInvalid`` (400) and says which of these failed, never the secret or the expected
signature.
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.errors import WebhookSignatureInvalid

TOLERANCE_S = 300


def verify_signature(
    body: bytes, header: str | None, secret: str, *, now: float, tolerance_s: int = TOLERANCE_S
) -> None:
    if not header:
        raise WebhookSignatureInvalid("the webhook has no Stripe-Signature header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookSignatureInvalid("the Stripe-Signature timestamp is not a number") from None
        elif key == "v1":
            signatures.append(value.strip())
    if timestamp is None:
        raise WebhookSignatureInvalid("the Stripe-Signature header has no timestamp (t=)")
    if not signatures:
        raise WebhookSignatureInvalid("the Stripe-Signature header has no v1 signature")
    expected = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    if not any(hmac.compare_digest(expected.encode(), candidate.encode()) for candidate in signatures):
        raise WebhookSignatureInvalid("no v1 signature in the Stripe-Signature header matches the body")
    if abs(now - timestamp) > tolerance_s:
        raise WebhookSignatureInvalid(
            f"the webhook's signature timestamp is {int(now - timestamp)} s away from now "
            f"(more than the {tolerance_s} s tolerance): a stale or replayed delivery"
        )
