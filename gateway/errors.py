"""One error tree for the whole gateway.

Every error knows its stable machine ``code``, its HTTP status and its JSON-RPC error code,
and carries a human ``message`` that says what was wrong and a ``hint`` that says what to do.
They are mapped to responses in exactly one place per surface (``gateway.proxy`` for MCP
traffic, ``gateway.api.service`` for the HTTP APIs) and to one line by the CLI.
"""

from __future__ import annotations

from typing import Any, ClassVar

# JSON-RPC 2.0 codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Gateway codes (documented in the README)
UNAUTHORIZED = -32001
FORBIDDEN = -32003
UPSTREAM_FAILED = -32010
HEADER_MISMATCH = -32020
PAYMENT_REQUIRED = -32402  # as in the draft MCP payment proposal
RESULT_WITHHELD = -32011  # a priced result the gateway can no longer bill is not delivered


class GatewayError(Exception):
    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    jsonrpc_code: ClassVar[int] = INTERNAL_ERROR
    default_hint: ClassVar[str] = ""

    def __init__(self, message: str, *, hint: str | None = None, data: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint if hint is not None else self.default_hint
        self.data: dict[str, Any] = data or {}

    def text(self) -> str:
        """The message and the hint as one sentence pair, for error bodies and the CLI."""
        return f"{self.message}. {self.hint}" if self.hint else self.message

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            body["hint"] = self.hint
        if self.data:
            body["details"] = self.data
        return body


# --- operator / configuration ---------------------------------------------------------------
class ConfigError(GatewayError):
    code = "config_error"

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None):
        where = file or ""
        if file and line:
            where = f"{file}:{line}"
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.line = line


class InvalidInput(GatewayError):
    code = "invalid_input"
    http_status = 400
    jsonrpc_code = INVALID_PARAMS


class NotFound(GatewayError):
    code = "not_found"
    http_status = 404
    jsonrpc_code = INVALID_PARAMS


class AlreadyExists(GatewayError):
    code = "already_exists"
    http_status = 409


class Conflict(GatewayError):
    code = "conflict"
    http_status = 409


class IdempotencyConflict(Conflict):
    code = "idempotency_conflict"
    default_hint = "Use a new idempotency key for a different request"


# --- MCP transport --------------------------------------------------------------------------
class BadRequest(GatewayError):
    code = "bad_request"
    http_status = 400
    jsonrpc_code = INVALID_REQUEST


class ParseError(BadRequest):
    code = "parse_error"
    jsonrpc_code = PARSE_ERROR
    default_hint = "Send a JSON-RPC 2.0 message as UTF-8 JSON"


class MethodNotAllowed(GatewayError):
    code = "method_not_allowed"
    http_status = 405
    jsonrpc_code = INVALID_REQUEST

    def __init__(self, message: str, *, allow: str, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.allow = allow


class HeaderMismatch(BadRequest):
    code = "header_mismatch"
    jsonrpc_code = HEADER_MISMATCH


class BodyTooLarge(GatewayError):
    code = "body_too_large"
    http_status = 413
    jsonrpc_code = INVALID_REQUEST


class UnknownServer(GatewayError):
    # 404 on an unknown path is what any HTTP server says; the body explains it.
    code = "unknown_server"
    http_status = 404
    jsonrpc_code = INVALID_REQUEST
    default_hint = "Check the gateway URL: servers are reached at /<server>/mcp"


class OriginForbidden(GatewayError):
    code = "origin_forbidden"
    http_status = 403
    jsonrpc_code = FORBIDDEN


# --- authentication -------------------------------------------------------------------------
class AuthError(GatewayError):
    code = "unauthorized"
    http_status = 401
    jsonrpc_code = UNAUTHORIZED
    default_hint = (
        "Send your AgentPay API key as 'Authorization: Bearer ap_...' or 'X-API-Key'; "
        "ask the gateway operator for a key for this server"
    )
    challenge: str | None = None  # the 401's WWW-Authenticate when OAuth is on (set by the proxy)


class MissingKey(AuthError):
    code = "missing_key"


class InvalidKey(AuthError):
    code = "invalid_key"


class ExpiredKey(AuthError):
    code = "expired_key"
    default_hint = "Ask the gateway operator for a new key"


class RevokedKey(AuthError):
    code = "revoked_key"
    default_hint = "This key was revoked; ask the gateway operator for a new key"


class WrongServer(AuthError):
    code = "wrong_server"
    http_status = 403
    jsonrpc_code = FORBIDDEN
    default_hint = "Each API key works for one server only; use the key issued for this server"


class Forbidden(GatewayError):
    code = "forbidden"
    http_status = 403
    jsonrpc_code = FORBIDDEN


# --- money ----------------------------------------------------------------------------------
class PaymentRequired(GatewayError):
    code = "payment_required"
    http_status = 402
    jsonrpc_code = PAYMENT_REQUIRED
    default_hint = "Ask the gateway operator to top up your AgentPay balance"


class InsufficientFunds(PaymentRequired):
    code = "insufficient_funds"


class SpendLimitReached(PaymentRequired):
    code = "spend_limit_reached"
    default_hint = "This key reached its spending limit; ask the gateway operator to raise it or issue a new key"


class AmountTooLarge(GatewayError):
    """One request's amount is over the most the ledger moves at once (``ledger.base.MAX_AMOUNT``)."""

    code = "amount_too_large"
    http_status = 422
    jsonrpc_code = INVALID_PARAMS
    default_hint = "Nothing was changed; send a smaller amount (split a very large one into several requests)"


class BalanceLimitExceeded(GatewayError):
    """A transfer would take an account past ``ledger.base.MAX_BALANCE`` (or the world account below
    its negative, i.e. more money in the ledger than it can hold): refused, nothing written."""

    code = "balance_limit_exceeded"
    http_status = 422
    jsonrpc_code = INVALID_PARAMS
    default_hint = (
        "Nothing was changed; move a smaller amount, or pay out or spend from the account first "
        "(balances are limited so that every sum the ledger keeps stays an exact 64-bit integer)"
    )


# --- upstream -------------------------------------------------------------------------------
class UpstreamError(GatewayError):
    code = "upstream_unavailable"
    http_status = 502
    jsonrpc_code = UPSTREAM_FAILED
    default_hint = "Nothing was charged; try again later or tell the server's developer"


class UpstreamTimeout(UpstreamError):
    code = "upstream_timeout"
    http_status = 504


class UpstreamAnswerTooLarge(UpstreamError):
    code = "upstream_answer_too_large"
    default_hint = "Nothing was charged; the server's developer must send a smaller answer (or stream it over SSE)"


class Unavailable(GatewayError):
    code = "unavailable"
    http_status = 503
    default_hint = "The gateway is shutting down or not ready; retry shortly"


class AccountNotFound(NotFound):
    """A ledger account named by an operator (``logins invite --user``) does not exist."""

    code = "account_not_found"


# --- logins (the portal's e-mail + password sign-in; ``gateway.logins``) ----------------------
class LoginError(GatewayError):
    """Anything a sign-up, sign-in or one-time link refuses. The portal shows ``message`` next to the
    form; none of them says whether an e-mail address has a login (except EmailTaken on sign-up)."""

    code = "login_error"
    http_status = 400
    jsonrpc_code = INVALID_PARAMS


class SignupClosed(LoginError):
    code = "signup_closed"
    http_status = 403
    default_hint = "Ask the operator for an invite"


class InvalidEmail(LoginError):
    code = "invalid_email"
    default_hint = "Enter an e-mail address such as alice@example.com"


class WeakPassword(LoginError):
    code = "weak_password"

    def __init__(self, reason: str, *, hint: str | None = None):
        super().__init__(reason, hint=hint or "Choose a password of 10 to 1024 characters that is not your e-mail")
        self.reason = reason


class EmailTaken(LoginError):
    code = "email_taken"
    http_status = 409
    default_hint = "Sign in instead, or reset your password"


class BadCredentials(LoginError):
    """Unknown e-mail, wrong password, disabled login or no password set: one answer for all."""

    code = "bad_credentials"
    http_status = 401
    default_hint = "Check the e-mail address and password"


class Unverified(LoginError):
    """The right password for an address not confirmed yet (SMTP on): no session until it is, so a
    stranger who signed up with someone else's address cannot use (or arm) the account meanwhile."""

    code = "unverified"
    http_status = 403
    default_hint = "Open the link we mailed you, or ask for a password reset to get a new one"


class Throttled(LoginError):
    code = "throttled"
    http_status = 429

    def __init__(self, message: str, *, retry_after_s: int, hint: str | None = None):
        super().__init__(message, hint=hint or f"Wait {retry_after_s} s before trying again")
        self.retry_after_s = retry_after_s
        self.data = {"retry_after_s": retry_after_s}


class LinkInvalid(LoginError):
    code = "link_invalid"
    default_hint = "The link was used already, has expired or is not complete; ask for a new one"


# --- OAuth (the gateway as authorization server; ``gateway.oauth``) ---------------------------
class InvalidToken(AuthError):
    """An OAuth access token that is unknown, expired or revoked (401, ``error="invalid_token"``)."""

    code = "invalid_token"
    default_hint = "Your connection's sign-in ended; reconnect the server in your client to sign in again"


class OAuthError(GatewayError):
    """An OAuth endpoint's refusal, answered as RFC 6749 §5.2 says: ``{"error", "error_description"}``.
    ``error`` is the RFC's code (invalid_request, invalid_client, invalid_grant, invalid_target, …)."""

    code = "oauth_error"
    http_status = 400
    jsonrpc_code = INVALID_REQUEST

    def __init__(self, error: str, message: str, *, status: int = 400, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.error = error
        self.status = status


# --- payments (Stripe top-ups and payouts; ``gateway.payments``) -------------------------------
class PaymentsNotConfigured(GatewayError):
    code = "payments_not_configured"
    http_status = 409
    jsonrpc_code = INVALID_REQUEST
    default_hint = "Add a payments.stripe section to the gateway configuration (see the README's Payments section)"


class WebhookSignatureInvalid(BadRequest):
    """A webhook whose Stripe-Signature is missing, forged or stale: answered 400, nothing changed."""

    code = "webhook_signature_invalid"
    default_hint = "Check that payments.stripe.webhook_secret is this endpoint's signing secret"


class PaymentProviderError(GatewayError):
    """Stripe refused a request or could not be reached."""

    code = "payment_provider_error"
    http_status = 502
    jsonrpc_code = INTERNAL_ERROR
    default_hint = "Nothing was charged; retry shortly (the same request is idempotent at Stripe)"
