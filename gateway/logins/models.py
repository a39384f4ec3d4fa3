"""The records of the logins concern: a login (e-mail + password, linked to ledger accounts by
name), a web session, and a one-time link. No HTTP, no database here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LinkPurpose = Literal["invite", "reset", "verify"]


@dataclass(frozen=True, slots=True)
class Login:
    id: str  # "lgn_" + hex
    email: str  # lower-cased, as signed up
    user: str | None  # ledger user account name (signup: the lower-cased e-mail)
    developer: str | None  # ledger developer account name, if this person is also a developer
    verified: bool
    disabled: bool
    has_password: bool
    created_at: float
    last_login_at: float | None


@dataclass(frozen=True, slots=True)
class WebSession:
    id: str  # public id ("wss_..."), NOT the cookie token
    login: Login
    csrf_token: str  # derived from the cookie token (HMAC): never stored; compare in constant time
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Link:
    """A one-time link (invite / password reset / e-mail verification)."""

    purpose: LinkPurpose
    email: str
    url: str  # absolute, from portal.base_url: {base}/portal/link/{token}
    expires_at: float


@dataclass(frozen=True, slots=True)
class LoginRow:
    """A login as stored, with its password hash (never leaves the service)."""

    login: Login
    password_hash: str | None


@dataclass(frozen=True, slots=True)
class LinkRow:
    """A one-time link as stored (by the SHA-256 of its token)."""

    purpose: LinkPurpose
    login_id: str
    email: str
    created_at: float
    expires_at: float
    used_at: float | None
