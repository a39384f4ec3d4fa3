"""API keys and service tokens: generation, hashing, display prefixes, extraction from requests.

Secrets are shown once at creation and stored only as a SHA-256 hash (they are 256-bit random
values, so a fast hash is the right tool: there is nothing to brute-force). Only ``prefix``
(the first characters) is ever displayed or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

API_KEY_PREFIX = "ap_"
SERVICE_TOKEN_PREFIX = "apst_"
_DISPLAY_CHARS = 8  # random characters shown after the type prefix


def generate_secret(kind_prefix: str = API_KEY_PREFIX) -> str:
    """A new secret: a recognisable type prefix and 43 URL-safe characters (256 bits)."""
    return kind_prefix + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # backslashreplace: a header aiohttp decoded with surrogate escapes still hashes (to no key)
    return hashlib.sha256(secret.encode("utf-8", "backslashreplace")).hexdigest()


# API keys, service tokens, and the OAuth secrets (gateway.oauth.models: access and refresh tokens,
# authorization codes, client secrets)
_SECRET_IN_TEXT = re.compile(r"(?:apst|apat|aprt|apac|apcs|ap)_[A-Za-z0-9_\-]{6,}")


def redact_secrets(text: str) -> str:
    """``text`` with anything shaped like an API key or service token replaced."""
    return _SECRET_IN_TEXT.sub("<redacted>", text)


def contains_secret(text: str) -> bool:
    """Whether ``text`` holds anything shaped like an API key or service token."""
    return _SECRET_IN_TEXT.search(text) is not None


def display_prefix(secret: str) -> str:
    """What may be shown or logged: the type prefix plus a few characters ("ap_3xK9q2Lm")."""
    for kind in (SERVICE_TOKEN_PREFIX, "apat_", "aprt_", API_KEY_PREFIX):
        if secret.startswith(kind):
            return secret[: len(kind) + _DISPLAY_CHARS]
    return secret[:4] + "…"


def constant_time_equals(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "backslashreplace"), b.encode("utf-8", "backslashreplace"))


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The caller's API key from ``Authorization: Bearer`` or ``X-API-Key``, if any."""
    auth = headers.get("Authorization") or headers.get("authorization")
    if auth:
        scheme, _, value = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    api_key = headers.get("X-API-Key") or headers.get("x-api-key")
    if api_key and api_key.strip():
        return api_key.strip()
    return None
