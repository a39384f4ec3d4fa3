"""Logins for ledger accounts: e-mail + password, web sessions, one-time links (issue 15).

Knows no HTTP (checked by import-linter): the portal (``gateway.portal``) is its face. Its tables
live beside the ledger's (``gateway.storage``), never in the ledger's interfaces.
"""

from __future__ import annotations

from gateway.logins.mail import Mailer
from gateway.logins.models import Link, Login, WebSession
from gateway.logins.passwords import Passwords
from gateway.logins.service import LoginService
from gateway.logins.store import LoginStore, open_login_store

__all__ = ["Link", "Login", "LoginService", "LoginStore", "Mailer", "Passwords", "WebSession", "open_login_store"]
