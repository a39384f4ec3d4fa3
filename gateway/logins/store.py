"""What the login service needs from a database: ``LoginStore``, implemented once per store
(``sqlite.py``, ``postgres.py``), and ``open_login_store`` to pick one for a database URL.

Tables (migrations ``logins_0001_...`` in each store's module): ``logins`` (one per e-mail),
``web_sessions`` (by the SHA-256 of the cookie token), ``login_links`` (one-time links, by the
SHA-256 of their token) and ``login_failures`` (failed sign-ins per e-mail, shared by replicas).
Tokens themselves are never stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from gateway.logins.models import LinkPurpose, LinkRow, Login, LoginRow
from gateway.logins.postgres import POSTGRES_MIGRATIONS, PostgresLoginStore
from gateway.logins.sqlite import SQLITE_MIGRATIONS, SqliteLoginStore
from gateway.storage import PostgresSide, open_side


class LoginStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def applied_migrations(self) -> list[str]: ...

    # --- logins ----------------------------------------------------------------------------------
    async def insert_login(self, login: Login, password_hash: str | None) -> None:
        """Raises EmailTaken when a login with this e-mail exists."""

    async def delete_login(self, login_id: str) -> None: ...

    async def login_by_email(self, email: str) -> LoginRow | None: ...

    async def login_by_id(self, login_id: str) -> LoginRow | None: ...

    async def list_logins(self) -> list[Login]: ...

    async def signed_in(self, login_id: str, at: float, new_hash: str | None) -> None:
        """Record a sign-in (and a rehashed password, when the parameters changed)."""

    async def set_password(self, login_id: str, password_hash: str) -> int:
        """Set the password and close every session of the login; the number closed."""

    async def link_accounts(
        self, login_id: str, user: str | None, developer: str | None, *, enable: bool
    ) -> Login | None:
        """Set the non-None account names (and enable the login when ``enable``)."""

    async def disable(self, email: str, at: float) -> tuple[Login, int] | None:
        """Disable the login and close its sessions: the login and the number closed (None: no such login)."""

    # --- sessions --------------------------------------------------------------------------------
    async def insert_session(
        self, session_id: str, token_hash: str, login_id: str, at: float, expires_at: float
    ) -> None:
        """Also removes the login's sessions that have expired."""

    async def touch_session(
        self, token_hash: str, now: float, ttl_s: float, max_s: float
    ) -> tuple[str, Login, float, float] | None:
        """The live session with this token hash: (id, login, created_at, expires_at), its expiry
        slid to ``min(now + ttl_s, created_at + max_s)``. None: unknown, expired, login disabled."""

    async def session_live(self, session_id: str, login_id: str, now: float) -> bool:
        """Whether the session ``session_id`` of ``login_id`` exists, is unexpired and its login enabled."""

    async def delete_session(self, token_hash: str) -> None: ...

    async def delete_sessions(self, login_id: str) -> int: ...

    # --- one-time links --------------------------------------------------------------------------
    async def insert_link(
        self, token_hash: str, purpose: LinkPurpose, login_id: str, email: str, at: float, expires_at: float
    ) -> None: ...

    async def link(self, token_hash: str) -> LinkRow | None: ...

    async def links_since(self, login_id: str, purpose: LinkPurpose, since: float) -> int: ...

    async def redeem_link(self, token_hash: str, now: float, password_hash: str | None) -> Login | None:
        """In one transaction: mark the link used (``UPDATE ... WHERE used_at IS NULL AND expires_at >
        now``; None when no row changed), then mark the login verified and, with a password, set it,
        close every session of the login and use up its other invite and reset links."""

    # --- failed sign-ins -------------------------------------------------------------------------
    async def count_attempt(self, key: str, at: float, window_s: float, limit: int) -> list[float]:
        """In one transaction serialised per ``key`` (an e-mail's hash): forget failures older than the
        window; if fewer than ``limit`` remain, record this attempt as a failure (it is cleared on
        success) and return []; else record nothing and return the remaining times, oldest first.
        Counting before the password is checked keeps parallel attempts within the limit."""

    async def clear_failures(self, key: str) -> None: ...


def open_login_store(database_url: str, *, clock: Callable[[], float] = time.time) -> LoginStore:
    """The login store on the ledger's database URL (not yet opened)."""
    side = open_side(
        database_url,
        concern="logins",
        sqlite_migrations=SQLITE_MIGRATIONS,
        postgres_migrations=POSTGRES_MIGRATIONS,
        clock=clock,
    )
    if isinstance(side, PostgresSide):
        return PostgresLoginStore(side)
    return SqliteLoginStore(side)
