"""Password hashing (argon2id through argon2-cffi) and the password and e-mail rules.

Hashing costs tens of milliseconds of CPU and 64 MiB: it runs in worker threads of its own
(``HASH_THREADS``), never on the event loop nor in the loop's default executor, so a flood of
sign-ups or sign-ins queues behind those threads only (at most ``HASH_THREADS`` hashes of 64 MiB at
once) and never delays what else uses the default executor (aiohttp's DNS lookups for upstreams).
An unknown e-mail is answered after verifying a dummy hash, so it takes as long as a wrong password.
"""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from gateway.errors import InvalidEmail, WeakPassword

MIN_PASSWORD = 10
MAX_PASSWORD = 1024  # argon2 hashes any length; a longer one only costs us (a DoS guard)
MAX_EMAIL = 254  # RFC 5321's path limit
HASH_THREADS = 2
_T = TypeVar("_T")


def normalize_email(text: str) -> str:
    """The e-mail lower-cased; InvalidEmail unless simple and strict: one '@', something on each
    side, a dot in the domain, no spaces or control characters, at most 254 characters."""
    email = text.strip().lower()
    local, _, domain = email.partition("@")
    if (
        not email
        or len(email) > MAX_EMAIL
        or email.count("@") != 1
        or not local
        or not domain
        or "." not in domain.strip(".")
        or domain.startswith(".")
        or domain.endswith(".")
        or ".." in domain
        or any(c.isspace() or unicodedata.category(c).startswith("C") for c in email)
        or any(c in email for c in '<>()[],;:\\"')
    ):
        raise InvalidEmail(f"{text[:80]!r} is not an e-mail address")
    return email


def check_password(password: str, email: str) -> None:
    """WeakPassword unless 10 to 1024 characters and not the e-mail address."""
    if len(password) < MIN_PASSWORD:
        raise WeakPassword(f"the password is shorter than {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise WeakPassword(f"the password is longer than {MAX_PASSWORD} characters")
    if password.strip().lower() == email.strip().lower():
        raise WeakPassword("the password is the e-mail address")


class Passwords:
    """argon2id hashes, verified and hashed in a worker thread. ``hasher`` defaults to argon2-cffi's
    RFC 9106 low-memory profile (time 3, 64 MiB, 4 lanes)."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher if hasher is not None else PasswordHasher()
        self._dummy: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="argon2")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _run(self, work: Callable[..., _T], *args: str) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, work, *args)

    async def hash(self, password: str) -> str:
        return await self._run(self.hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> tuple[bool, str | None]:
        """(whether ``password`` matches, a new hash when the stored one's parameters are outdated).
        With no hash (unknown e-mail, no password set) a dummy hash is verified: the same time, False."""
        if password_hash is None:
            if self._dummy is None:
                self._dummy = await self.hash("agentpay dummy password, never matched")
            await self._run(self._check, self._dummy, password)
            return False, None
        if not await self._run(self._check, password_hash, password):
            return False, None
        if self.hasher.check_needs_rehash(password_hash):
            return True, await self.hash(password)
        return True, None

    def _check(self, password_hash: str, password: str) -> bool:
        try:
            return self.hasher.verify(password_hash, password)
        except VerifyMismatchError:
            return False
        except (InvalidHashError, VerificationError):
            return False
