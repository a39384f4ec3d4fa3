"""``POST /payments/stripe/webhook`` on the main listener: Stripe's events.

The raw body is read (at most ``MAX_BODY``) and its ``Stripe-Signature`` checked before anything
parses it; a missing, forged or stale signature is answered 400 and changes nothing. A verified event
is applied by ``Payments.handle_webhook_event`` and answered 200 with its outcome; a failure to apply
it (the database or Stripe unreachable) is answered 500 so that Stripe delivers it again (the handlers
are idempotent). Each delivery is logged with the event id, type and outcome; never the secret.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from gateway.errors import BadRequest, BodyTooLarge, GatewayError, PaymentsNotConfigured, WebhookSignatureInvalid
from gateway.payments.service import Payments
from gateway.payments.signature import verify_signature

log = structlog.get_logger("gateway.payments")
PATH = "/payments/stripe/webhook"
MAX_BODY = 512 * 1024  # Stripe's events are a few KiB; a larger body is not one


def webhook_handler(
    payments: Callable[[web.Request], Payments | None], *, now: Callable[[], float]
) -> Callable[[web.Request], Any]:
    async def handle(request: web.Request) -> web.Response:
        try:
            return await _handle(request)
        except GatewayError as exc:  # answered as JSON here (this is no MCP endpoint)
            return web.json_response({"error": exc.to_json()}, status=exc.http_status)

    async def _handle(request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.json_response(
                {"error": {"code": "method_not_allowed", "message": "Stripe webhooks are POSTed"}},
                status=405,
                headers={"Allow": "POST"},
            )
        service = payments(request)
        if service is None:
            raise PaymentsNotConfigured("this gateway has no payments.stripe configuration")
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise BodyTooLarge(f"a webhook body is at most {MAX_BODY} bytes")
        chunks: list[bytes] = []
        size = 0
        while chunk := await request.content.read(65536):  # read() may return less than asked: loop to EOF
            size += len(chunk)
            if size > MAX_BODY:
                raise BodyTooLarge(f"a webhook body is at most {MAX_BODY} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            verify_signature(body, request.headers.get("Stripe-Signature"), service.config.webhook_secret, now=now())
        except WebhookSignatureInvalid as exc:
            log.warning("payments_webhook_refused", reason=exc.message)
            raise
        try:
            event = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the webhook body is not JSON") from None
        if not isinstance(event, dict) or not isinstance(event.get("id"), str):
            raise BadRequest("the webhook body is not a Stripe event")
        try:
            outcome = await service.handle_webhook_event(event)
        except GatewayError as exc:
            log.warning("payments_webhook", event_id=event.get("id"), type=event.get("type"), outcome="error",
                        error=exc.code, message=exc.message)  # fmt: skip
            if exc.http_status < 500 and not isinstance(exc, PaymentsNotConfigured):
                # the event is wrong for us (unknown user, conflicting amounts): retrying cannot help
                return web.json_response({"received": True, "outcome": f"refused: {exc.code}"})
            return web.json_response({"received": False, "error": exc.code}, status=500)
        return web.json_response({"received": True, "outcome": outcome})

    return handle
