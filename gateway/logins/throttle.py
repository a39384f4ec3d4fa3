"""Sign-in throttling, per account and per client address.

Per account (the e-mail tried, whether it has a login or not, so throttling reveals nothing): at
most ``per_account`` failures in ``window_s``, counted in the database so every replica sees the
same count. Per client address: at most ``per_address`` failures in the window, counted in this
process's memory (a replica counts its own; the per-account limit is the one that holds across
replicas). An attempt is counted as a failure *before* the password is checked and forgotten when
it succeeds, so attempts sent in parallel cannot get past the limit while the first ones are being
checked. Over a limit every attempt is refused, right or wrong, with the seconds until the oldest
counted failure leaves the window. A success clears the account's count.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import Throttled
from gateway.logins.store import LoginStore

PER_ACCOUNT = 5
PER_ADDRESS = 20
WINDOW_S = 15 * 60.0
MAX_ADDRESSES = 100_000  # addresses remembered at once; the least recently failed are forgotten first


def account_key(email: str) -> str:
    """What the failures of an e-mail are stored under: its SHA-256, not the address typed."""
    return hashlib.sha256(b"login:" + email.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Attempt:
    """An attempt counted as a failure until ``Throttle.succeeded`` says otherwise."""

    key: str
    client: str
    at: float


class Throttle:
    def __init__(
        self,
        store: LoginStore,
        clock: Callable[[], float],
        *,
        per_account: int = PER_ACCOUNT,
        per_address: int = PER_ADDRESS,
        window_s: float = WINDOW_S,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self._store = store
        self._clock = clock
        self.per_account = per_account
        self.per_address = per_address
        self.window_s = window_s
        self._max_addresses = max_addresses
        self._addresses: OrderedDict[str, deque[float]] = OrderedDict()

    def _retry_after(self, oldest: float, now: float) -> int:
        return max(1, math.ceil(oldest + self.window_s - now))

    def _address_failures(self, client: str, now: float) -> deque[float]:
        times = self._addresses.get(client)
        if times is None:
            times = self._addresses[client] = deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        self._addresses.move_to_end(client)
        while len(self._addresses) > self._max_addresses:
            self._addresses.popitem(last=False)
        return times

    async def attempt(self, email: str, client: str) -> Attempt:
        """Count an attempt (as a failure, for now); Throttled when the address or the account is
        over its limit (then nothing is counted)."""
        now = self._clock()
        times = self._address_failures(client, now)
        if len(times) >= self.per_address:
            retry = self._retry_after(times[-self.per_address], now)
            raise Throttled("too many failed sign-ins from this address", retry_after_s=retry)
        times.append(now)  # before any await: parallel attempts from one address see each other
        key = account_key(email)
        try:
            failures = await self._store.count_attempt(key, now, self.window_s, self.per_account)
        except BaseException:
            self._forget(client, now)
            raise
        if failures:
            self._forget(client, now)
            retry = self._retry_after(failures[-self.per_account], now)
            raise Throttled("too many failed sign-ins for this account", retry_after_s=retry)
        return Attempt(key, client, now)

    async def succeeded(self, attempt: Attempt) -> None:
        """The attempt was right: it was no failure, and the account's count starts again."""
        self._forget(attempt.client, attempt.at)
        await self._store.clear_failures(attempt.key)

    async def reset(self, email: str) -> None:
        """Clear the account's count (a password set through a one-time link)."""
        await self._store.clear_failures(account_key(email))

    def _forget(self, client: str, at: float) -> None:
        times = self._addresses.get(client)
        if times is not None:
            try:
                times.remove(at)
            except ValueError:
                return  # already out of the window
