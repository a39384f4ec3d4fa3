"""``LoginService``: sign-up, sign-in, web sessions and one-time links for the portal.

A login is an e-mail address and an argon2id password hash, linked by name to a ledger user
account (and optionally a developer account). The service knows no HTTP: the portal calls it. It
changes money only by creating a zero-balance user account at sign-up, through the ledger's
``Accounts``. Secrets (session cookies, link tokens) are ``secrets.token_urlsafe(32)``; only their
SHA-256 is stored. Every refusal is a ``gateway.errors.LoginError``.

Sign-up policy (``portal.signup``):
- ``open``: anyone signs up; the user account is named after the lower-cased e-mail.
- ``invite``: the sign-up form is refused (SignupClosed: "ask the operator for an invite");
  ``agentpay logins invite EMAIL`` with neither --user nor --developer creates the user account
  named after the e-mail when it does not exist yet (the invite stands in for the sign-up).
- ``closed``: the form is refused the same way, and ``logins invite`` only links accounts that
  already exist (AccountNotFound otherwise).
A sign-up whose e-mail already names a ledger user account is refused (EmailTaken): that account
was made by the operator, who links it with ``logins invite``; a stranger must not take it over.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, Literal

import structlog

from gateway.config import PortalConfig
from gateway.errors import (
    AccountNotFound,
    AlreadyExists,
    BadCredentials,
    EmailTaken,
    InvalidEmail,
    LinkInvalid,
    NotFound,
    SignupClosed,
    Unavailable,
    Unverified,
    WeakPassword,
)
from gateway.ledger.base import AccountKind
from gateway.ledger.interfaces import Accounts
from gateway.logins.mail import Mailer
from gateway.logins.models import Link, LinkPurpose, Login, WebSession
from gateway.logins.passwords import MAX_PASSWORD, Passwords, check_password, normalize_email
from gateway.logins.store import LoginStore
from gateway.logins.throttle import Throttle

log = structlog.get_logger("gateway.logins")

MAX_SESSION_S = 30 * 24 * 3600.0  # a session ends this long after sign-in, however often it is used
LINK_TTL_S: dict[LinkPurpose, float] = {"invite": 7 * 24 * 3600.0, "reset": 3600.0, "verify": 2 * 24 * 3600.0}
RESETS_PER_HOUR = 3  # reset mails per login per hour; more requests are answered the same, sending nothing
MAX_TOKEN = 128  # longer "tokens" are not ours: refused before hashing
MAIL_DRAIN_S = 10.0


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def csrf_for(token: str) -> str:
    """The session's CSRF token: an HMAC of the cookie token, so it is never stored and only the
    holder of the (HttpOnly) cookie can have it."""
    digest = hmac.new(token.encode(), b"agentpay portal csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class LoginService:
    def __init__(
        self,
        store: LoginStore,
        accounts: Accounts,
        *,
        config: PortalConfig,
        mailer: Mailer | None = None,
        clock: Callable[[], float] = time.time,
        passwords: Passwords | None = None,
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.config = config
        self.signup_policy: Literal["open", "invite", "closed"] = config.signup
        self.mailer = mailer
        self.mail_enabled = mailer is not None
        self.base_url = (config.base_url or "http://127.0.0.1:8080").rstrip("/")
        self.clock = clock
        self._own_passwords = passwords is None  # its threads end with this service
        self.passwords = passwords if passwords is not None else Passwords()
        self.throttle = Throttle(store, clock)
        self._mail_tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        await self.store.open()

    async def close(self) -> None:
        if self._mail_tasks:
            _, late = await asyncio.wait(set(self._mail_tasks), timeout=MAIL_DRAIN_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self._own_passwords:
            self.passwords.close()
        await self.store.close()

    # --- sign-up and sign-in ---------------------------------------------------------------------
    async def signup(self, email: str, password: str) -> Login:
        if self.signup_policy != "open":
            message = "sign-up is by invitation" if self.signup_policy == "invite" else "sign-up is closed"
            raise SignupClosed(message, hint="Ask the operator for an invite")
        email = normalize_email(email)
        check_password(password, email)
        if await self.store.login_by_email(email) is not None:
            raise EmailTaken(f"{email} already has a login")
        if await self._exists(AccountKind.USER, email):
            raise EmailTaken(f"{email} already has an account", hint="Ask the operator for an invite to sign in to it")
        password_hash = await self.passwords.hash(password)
        now = self.clock()
        login = Login(
            id="lgn_" + secrets.token_hex(12),
            email=email,
            user=email,
            developer=None,
            verified=not self.mail_enabled,
            disabled=False,
            has_password=True,
            created_at=now,
            last_login_at=None,
        )
        await self.store.insert_login(login, password_hash)
        try:
            await self.accounts.create_user(email)
        except AlreadyExists:
            await self.store.delete_login(login.id)
            raise EmailTaken(f"{email} already has an account") from None
        except BaseException:
            await self.store.delete_login(login.id)
            raise
        if self.mailer is not None:
            self._mail(await self._new_link("verify", login))
        log.info("login_signed_up", login=login.id)
        return login

    async def authenticate(self, email: str, password: str, *, client: str) -> Login:
        """BadCredentials for an unknown e-mail, a wrong password, a disabled login or one without a
        password, all after verifying a hash (the same time); Throttled past the limits."""
        try:
            key = normalize_email(email)
        except InvalidEmail:
            key = email.strip().lower()[:254]
        attempt = await self.throttle.attempt(key, client)  # counted as a failure unless it succeeds
        row = await self.store.login_by_email(key)
        candidate = password if len(password) <= MAX_PASSWORD else ""
        ok, new_hash = await self.passwords.verify(row.password_hash if row is not None else None, candidate)
        if not ok or row is None or row.login.disabled or len(password) > MAX_PASSWORD:
            raise BadCredentials("the e-mail address or the password is wrong")
        await self.throttle.succeeded(attempt)
        if self.mail_enabled and not row.login.verified:  # only the password's holder learns this
            raise Unverified(f"{row.login.email} is not confirmed yet")
        now = self.clock()
        await self.store.signed_in(row.login.id, now, new_hash)
        return replace(row.login, last_login_at=now)

    # --- sessions --------------------------------------------------------------------------------
    async def open_session(self, login: Login) -> tuple[str, WebSession]:
        """A new session (the portal calls it on every sign-in: a new id, never a reused one)."""
        if login.disabled:
            raise BadCredentials("the e-mail address or the password is wrong")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        session_id = "wss_" + secrets.token_hex(12)
        expires_at = min(now + self.config.session_ttl_s, now + MAX_SESSION_S)
        await self.store.insert_session(session_id, token_hash(token), login.id, now, expires_at)
        return token, WebSession(session_id, login, csrf_for(token), now, expires_at)

    async def session(self, token: str) -> WebSession | None:
        if not token or len(token) > MAX_TOKEN:
            return None
        found = await self.store.touch_session(
            token_hash(token), self.clock(), self.config.session_ttl_s, MAX_SESSION_S
        )
        if found is None:
            return None
        session_id, login, created_at, expires_at = found
        return WebSession(session_id, login, csrf_for(token), created_at, expires_at)

    async def session_live(self, session_id: str, login_id: str) -> bool:
        """Whether a session (by its public id, as a consent ticket names it) is still signed in."""
        return await self.store.session_live(session_id, login_id, self.clock())

    async def close_session(self, token: str) -> None:
        if token and len(token) <= MAX_TOKEN:
            await self.store.delete_session(token_hash(token))

    async def close_all_sessions(self, login_id: str) -> int:
        return await self.store.delete_sessions(login_id)

    async def change_password(self, login_id: str, current: str, new: str) -> None:
        """BadCredentials (wrong current password) / WeakPassword; closes every session of the login."""
        row = await self.store.login_by_id(login_id)
        if row is None or row.login.disabled:
            raise BadCredentials("the current password is wrong")
        email = row.login.email
        check_password(new, email)
        attempt = await self.throttle.attempt(email, f"change-password:{login_id}")
        ok, _ = await self.passwords.verify(row.password_hash, current if len(current) <= MAX_PASSWORD else "")
        if not ok:
            raise BadCredentials("the current password is wrong")
        await self.throttle.succeeded(attempt)
        await self.store.set_password(login_id, await self.passwords.hash(new))
        log.info("login_password_changed", login=login_id)

    # --- one-time links --------------------------------------------------------------------------
    async def invite(self, email: str, *, user: str | None = None, developer: str | None = None) -> Link:
        """A one-time link that sets the password on first use, for accounts that exist (AccountNotFound
        otherwise). Creates the login or links the named accounts to it (and enables it again)."""
        email = normalize_email(email)
        if user is not None:
            await self._require(AccountKind.USER, user)
        if developer is not None:
            await self._require(AccountKind.DEVELOPER, developer)
        row = await self.store.login_by_email(email)
        if row is not None:
            login = await self.store.link_accounts(row.login.id, user, developer, enable=True)
            if login is None:  # deleted meanwhile
                raise NotFound(f"the login of {email} disappeared", hint="Run the command again")
        else:
            if user is None and developer is None:
                user = email
                if self.signup_policy == "closed":
                    await self._require(AccountKind.USER, email)
                elif not await self._exists(AccountKind.USER, email):
                    with contextlib.suppress(AlreadyExists):  # created meanwhile: the same account
                        await self.accounts.create_user(email)
            login = Login(
                id="lgn_" + secrets.token_hex(12),
                email=email,
                user=user,
                developer=developer,
                verified=False,
                disabled=False,
                has_password=False,
                created_at=self.clock(),
                last_login_at=None,
            )
            await self.store.insert_login(login, None)
        link = await self._new_link("invite", login)
        log.info("login_invited", login=login.id)
        return link

    async def peek_link(self, token: str) -> Link | None:
        """The link, for rendering its page; None when unknown, used or expired."""
        if not token or len(token) > MAX_TOKEN:
            return None
        row = await self.store.link(token_hash(token))
        if row is None or row.used_at is not None or row.expires_at <= self.clock():
            return None
        return Link(row.purpose, row.email, self._url(token), row.expires_at)

    async def redeem_link(self, token: str, password: str | None) -> Login:
        """invite/reset: sets the password (required); verify: marks the address verified. Either
        way the address counts as verified. Single use: a second use raises LinkInvalid."""
        invalid = LinkInvalid("this link is not valid")
        if not token or len(token) > MAX_TOKEN:
            raise invalid
        row = await self.store.link(token_hash(token))
        if row is None or row.used_at is not None or row.expires_at <= self.clock():
            raise invalid
        password_hash = None
        if row.purpose in ("invite", "reset"):
            if password is None:
                raise WeakPassword("choose a password")
            check_password(password, row.email)
            password_hash = await self.passwords.hash(password)
        login = await self.store.redeem_link(token_hash(token), self.clock(), password_hash)
        if login is None:
            raise invalid
        if password_hash is not None:
            await self.throttle.reset(login.email)
        log.info("login_link_used", login=login.id, purpose=row.purpose)
        return login

    async def request_reset(self, email: str) -> None:
        """Always returns, the same way: mails a reset link (in the background) when SMTP is set,
        the login exists and is enabled, and it had fewer than 3 reset links in the last hour."""
        if self.mailer is None:
            return
        try:
            email = normalize_email(email)
        except InvalidEmail:
            return
        row = await self.store.login_by_email(email)
        if row is None or row.login.disabled:
            return
        if await self.store.links_since(row.login.id, "reset", self.clock() - 3600) >= RESETS_PER_HOUR:
            return
        self._mail(await self._new_link("reset", row.login))

    # --- operators -------------------------------------------------------------------------------
    async def list_logins(self) -> list[Login]:
        return await self.store.list_logins()

    async def find_login(self, email: str) -> Login | None:
        """The login of an e-mail address (any case), or None."""
        try:
            row = await self.store.login_by_email(normalize_email(email))
        except InvalidEmail:
            return None
        return None if row is None else row.login

    async def get_login(self, login_id: str) -> Login | None:
        row = await self.store.login_by_id(login_id)
        return None if row is None else row.login

    async def disable(self, email: str) -> Login:
        """Disable the login (it can no longer sign in) and close its sessions."""
        email = normalize_email(email)
        result = await self.store.disable(email, self.clock())
        if result is None:
            raise NotFound(f"no login for {email}", hint="See `agentpay logins list`")
        login, closed = result
        log.info("login_disabled", login=login.id, sessions_closed=closed)
        return login

    # --- internals -------------------------------------------------------------------------------
    def _url(self, token: str) -> str:
        return f"{self.base_url}/portal/link/{token}"

    async def _new_link(self, purpose: LinkPurpose, login: Login) -> Link:
        token = secrets.token_urlsafe(32)
        now = self.clock()
        expires_at = now + LINK_TTL_S[purpose]
        await self.store.insert_link(token_hash(token), purpose, login.id, login.email, now, expires_at)
        return Link(purpose, login.email, self._url(token), expires_at)

    def _mail(self, link: Link) -> None:
        """Send in the background: the answer (and its timing) does not depend on the mail server."""
        mailer = self.mailer
        if mailer is None:
            return

        async def send() -> None:
            try:
                await mailer.send_link(link)
            except Unavailable:
                return  # logged by the mailer; the user can ask again

        self._spawn(send())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._mail_tasks.add(task)
        task.add_done_callback(self._mail_tasks.discard)

    async def _exists(self, kind: AccountKind, name: str) -> bool:
        try:
            await self.accounts.get_account(kind, name)
        except NotFound:
            return False
        return True

    async def _require(self, kind: AccountKind, name: str) -> None:
        if not await self._exists(kind, name):
            command = "users create" if kind is AccountKind.USER else "developers create"
            raise AccountNotFound(
                f"there is no {kind.value} account {name!r}", hint=f"Create it first with `agentpay {command} {name}`"
            )
