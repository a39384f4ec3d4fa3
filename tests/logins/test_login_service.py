"""The login service on each store: sign-up, sign-in, throttling, sessions and one-time links."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from argon2 import PasswordHasher

from gateway.api.operations import Operations
from gateway.errors import (
    AccountNotFound,
    BadCredentials,
    EmailTaken,
    InvalidEmail,
    LinkInvalid,
    NotFound,
    SignupClosed,
    Throttled,
    WeakPassword,
)
from gateway.ledger.base import AccountKind
from gateway.logins import Passwords
from gateway.logins.passwords import HASH_THREADS
from gateway.logins.service import MAX_SESSION_S, csrf_for
from tests.logins.conftest import BASE_URL, LoginsEnv

PASSWORD = "correct horse battery"


async def test_signup_creates_a_user_account_with_zero_balance_named_after_the_lower_cased_email(
    env: LoginsEnv,
) -> None:
    login = await env.service.signup("  Alice@Example.COM ", PASSWORD)
    assert login.email == "alice@example.com" and login.user == "alice@example.com"
    assert login.id.startswith("lgn_") and login.has_password and not login.disabled
    assert login.verified  # no SMTP: verification is off
    account = await env.ledger.get_account(AccountKind.USER, "alice@example.com")
    assert account.balance == 0 and account.held == 0
    topped = await Operations(env.ledger).topup("alice@example.com", "500")
    assert topped["balance_cents"] == "500"


async def test_signup_with_an_email_that_has_a_login_is_refused_as_taken(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    with pytest.raises(EmailTaken):
        await env.service.signup("ALICE@example.com", "another password 1")


async def test_signup_with_an_email_naming_an_operator_made_account_is_refused(env: LoginsEnv) -> None:
    await env.ledger.create_user("bob@example.com")
    with pytest.raises(EmailTaken):
        await env.service.signup("bob@example.com", PASSWORD)
    assert await env.service.list_logins() == []


@pytest.mark.parametrize(
    "email", ["", "alice", "alice@", "@example.com", "a@b@example.com", "al ice@example.com", "a@example", "a\x00@x.io"]
)
async def test_signup_with_a_malformed_email_is_refused(env: LoginsEnv, email: str) -> None:
    with pytest.raises(InvalidEmail):
        await env.service.signup(email, PASSWORD)


async def test_signup_with_a_too_long_email_is_refused(env: LoginsEnv) -> None:
    with pytest.raises(InvalidEmail):
        await env.service.signup("a" * 250 + "@example.com", PASSWORD)


@pytest.mark.parametrize("password", ["short", "x" * 1025, "alice@example.com"])
async def test_signup_with_a_weak_password_is_refused_and_creates_nothing(env: LoginsEnv, password: str) -> None:
    with pytest.raises(WeakPassword):
        await env.service.signup("alice@example.com", password)
    assert await env.service.list_logins() == []


@pytest.mark.parametrize("policy", ["invite", "closed"])
async def test_signup_is_refused_unless_the_policy_is_open(env: LoginsEnv, policy: str) -> None:
    service = env.make(signup=policy)
    await service.open()
    with pytest.raises(SignupClosed) as refused:
        await service.signup("alice@example.com", PASSWORD)
    assert "invite" in refused.value.text()


async def test_the_right_password_signs_in_and_records_the_time(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    env.clock.advance(10)
    login = await env.service.authenticate("ALICE@example.com", PASSWORD, client="10.0.0.1")
    assert login.email == "alice@example.com" and login.last_login_at == env.clock.now
    (listed,) = await env.service.list_logins()
    assert listed.last_login_at == env.clock.now


async def test_a_wrong_password_and_an_unknown_email_give_the_same_error(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    with pytest.raises(BadCredentials) as wrong:
        await env.service.authenticate("alice@example.com", "wrong password!", client="10.0.0.1")
    with pytest.raises(BadCredentials) as unknown:
        await env.service.authenticate("nobody@example.com", PASSWORD, client="10.0.0.1")
    with pytest.raises(BadCredentials) as malformed:
        await env.service.authenticate("not an e-mail", PASSWORD, client="10.0.0.1")
    assert wrong.value.to_json() == unknown.value.to_json() == malformed.value.to_json()


async def test_an_unknown_email_is_answered_after_verifying_a_dummy_hash(env: LoginsEnv) -> None:
    hasher = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    verified: list[str] = []

    class Counting(PasswordHasher):
        def verify(self, hash: str | bytes, password: str | bytes) -> bool:
            verified.append(str(hash))
            return hasher.verify(hash, password)

    service = env.make(passwords=Passwords(Counting(time_cost=1, memory_cost=1024, parallelism=1)))
    await service.open()
    with pytest.raises(BadCredentials):
        await service.authenticate("nobody@example.com", PASSWORD, client="10.0.0.1")
    assert len(verified) == 1 and verified[0].startswith("$argon2id$")


async def test_passwords_are_stored_as_argon2id_and_rehashed_on_sign_in_when_the_parameters_change(
    env: LoginsEnv,
) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    old = await env.spec.fetchval("SELECT password_hash FROM logins WHERE email = ?", "alice@example.com")
    assert old.startswith("$argon2id$") and "m=1024" in old and PASSWORD not in old
    stronger = env.make(passwords=Passwords())  # argon2-cffi's defaults (64 MiB)
    await stronger.open()
    await stronger.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")
    new = await env.spec.fetchval("SELECT password_hash FROM logins WHERE email = ?", "alice@example.com")
    assert new.startswith("$argon2id$") and "m=65536" in new
    await stronger.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")


async def test_five_failures_throttle_the_account_until_the_window_passes(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    for attempt in range(5):
        with pytest.raises(BadCredentials):
            await env.service.authenticate("alice@example.com", f"wrong password {attempt}", client=f"10.0.0.{attempt}")
        env.clock.advance(60)
    with pytest.raises(Throttled) as throttled:  # even the right password, from a new address
        await env.service.authenticate("alice@example.com", PASSWORD, client="10.9.9.9")
    # the first failure leaves the 15-minute window 15 min after it: 5 minutes have passed since
    assert throttled.value.retry_after_s == 15 * 60 - 5 * 60
    assert throttled.value.http_status == 429
    env.clock.advance(throttled.value.retry_after_s)
    assert (await env.service.authenticate("alice@example.com", PASSWORD, client="10.9.9.9")).email


async def test_the_account_throttle_is_shared_by_every_replica(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    other = env.make()
    await other.open()
    for attempt in range(5):
        service = env.service if attempt % 2 else other
        with pytest.raises(BadCredentials):
            await service.authenticate("alice@example.com", "wrong password!", client=f"10.0.0.{attempt}")
    for service in (env.service, other):
        with pytest.raises(Throttled):
            await service.authenticate("alice@example.com", PASSWORD, client="10.1.1.1")


async def test_parallel_guesses_on_two_replicas_get_no_more_than_five_password_checks(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    other = env.make()
    await other.open()
    guesses = [
        (env.service if n % 2 else other).authenticate("alice@example.com", f"guess number {n}", client=f"10.0.1.{n}")
        for n in range(16)
    ]
    outcomes = await asyncio.gather(*guesses, return_exceptions=True)
    assert sorted(type(outcome).__name__ for outcome in outcomes) == ["BadCredentials"] * 5 + ["Throttled"] * 11


async def test_unknown_emails_are_throttled_like_known_ones(env: LoginsEnv) -> None:
    for _ in range(5):
        with pytest.raises(BadCredentials):
            await env.service.authenticate("nobody@example.com", "wrong password!", client="10.0.0.1")
    with pytest.raises(Throttled):
        await env.service.authenticate("nobody@example.com", "wrong password!", client="10.0.0.2")


async def test_twenty_failures_from_one_address_throttle_that_address_only(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    for attempt in range(20):
        with pytest.raises(BadCredentials):
            await env.service.authenticate(f"user{attempt}@example.com", "wrong password!", client="10.6.6.6")
    with pytest.raises(Throttled) as throttled:
        await env.service.authenticate("alice@example.com", PASSWORD, client="10.6.6.6")
    assert throttled.value.retry_after_s == 15 * 60
    assert (await env.service.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")).email
    env.clock.advance(15 * 60)
    assert (await env.service.authenticate("alice@example.com", PASSWORD, client="10.6.6.6")).email


async def test_a_success_clears_the_account_failures(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    for _ in range(4):
        with pytest.raises(BadCredentials):
            await env.service.authenticate("alice@example.com", "wrong password!", client="10.0.0.1")
    await env.service.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")
    for _ in range(4):
        with pytest.raises(BadCredentials):
            await env.service.authenticate("alice@example.com", "wrong password!", client="10.0.0.1")
    await env.service.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")


async def test_a_session_token_is_stored_only_as_its_sha256(env: LoginsEnv) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    token, session = await env.service.open_session(login)
    assert len(token) >= 43 and session.id.startswith("wss_") and token not in session.id
    stored = await env.spec.fetchval("SELECT token_hash FROM web_sessions WHERE id = ?", session.id)
    assert stored == hashlib.sha256(token.encode()).hexdigest()
    count = await env.spec.fetchval("SELECT COUNT(*) FROM web_sessions WHERE token_hash = ? OR id = ?", token, token)
    assert count == 0
    found = await env.service.session(token)
    assert found is not None and found.id == session.id and found.login.email == "alice@example.com"
    assert found.csrf_token == session.csrf_token == csrf_for(token) and session.csrf_token != token
    assert await env.service.session(token + "x") is None
    assert await env.service.session("") is None


async def test_every_sign_in_gets_a_new_session(env: LoginsEnv) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    first, one = await env.service.open_session(login)
    second, two = await env.service.open_session(login)
    assert first != second and one.id != two.id and one.csrf_token != two.csrf_token


async def test_a_session_slides_with_use_and_ends_30_days_after_sign_in(env: LoginsEnv) -> None:
    service = env.make(session_ttl_s=7 * 24 * 3600.0)
    await service.open()
    login = await service.signup("alice@example.com", PASSWORD)
    token, session = await service.open_session(login)
    assert session.expires_at == env.clock.now + 7 * 24 * 3600
    for _ in range(4):  # used every 6 days: still alive after 24 days
        env.clock.advance(6 * 24 * 3600)
        assert await service.session(token) is not None
    env.clock.advance(6 * 24 * 3600)  # 30 days after sign-in
    assert await service.session(token) is None
    token, session = await service.open_session(login)
    env.clock.advance(7 * 24 * 3600)  # unused for the whole ttl
    assert await service.session(token) is None
    assert MAX_SESSION_S == 30 * 24 * 3600


async def test_signing_out_ends_that_session_only_and_everywhere_ends_them_all(env: LoginsEnv) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    tokens = [(await env.service.open_session(login))[0] for _ in range(3)]
    await env.service.close_session(tokens[0])
    assert await env.service.session(tokens[0]) is None
    assert await env.service.session(tokens[1]) is not None
    assert await env.service.close_all_sessions(login.id) == 2
    assert [await env.service.session(token) for token in tokens] == [None, None, None]


async def test_a_session_is_live_by_its_public_id_until_it_ends_expires_or_its_login_is_disabled(
    env: LoginsEnv,
) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    other = await env.service.signup("bob@example.com", PASSWORD)
    token, ws = await env.service.open_session(login)
    assert await env.service.session_live(ws.id, login.id)
    assert not await env.service.session_live(ws.id, other.id)  # the id alone names no one else's session
    await env.service.close_session(token)
    assert not await env.service.session_live(ws.id, login.id)
    _, ws = await env.service.open_session(login)
    await env.service.disable("alice@example.com")
    assert not await env.service.session_live(ws.id, login.id)
    _, ws = await env.service.open_session(other)
    env.clock.advance(env.service.config.session_ttl_s + 1)
    assert not await env.service.session_live(ws.id, other.id)


async def test_changing_the_password_needs_the_current_one_and_ends_every_session(env: LoginsEnv) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    token, _ = await env.service.open_session(login)
    with pytest.raises(BadCredentials):
        await env.service.change_password(login.id, "not my password", "a brand new password")
    with pytest.raises(WeakPassword):
        await env.service.change_password(login.id, PASSWORD, "short")
    assert await env.service.session(token) is not None
    await env.service.change_password(login.id, PASSWORD, "a brand new password")
    assert await env.service.session(token) is None
    with pytest.raises(BadCredentials):
        await env.service.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")
    await env.service.authenticate("alice@example.com", "a brand new password", client="10.0.0.1")


async def test_a_disabled_login_cannot_sign_in_and_its_sessions_end(env: LoginsEnv) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    token, _ = await env.service.open_session(login)
    disabled = await env.service.disable("Alice@example.com")
    assert disabled.disabled
    assert await env.service.session(token) is None
    with pytest.raises(BadCredentials):
        await env.service.authenticate("alice@example.com", PASSWORD, client="10.0.0.1")
    with pytest.raises(BadCredentials):
        await env.service.open_session(disabled)
    with pytest.raises(NotFound):
        await env.service.disable("nobody@example.com")


async def test_an_invite_link_sets_the_password_once_and_a_second_use_is_invalid(env: LoginsEnv) -> None:
    await env.ledger.create_user("carol")
    await env.ledger.create_developer("acme")
    link = await env.service.invite("Carol@Example.com", user="carol", developer="acme")
    assert link.purpose == "invite" and link.email == "carol@example.com"
    assert link.url.startswith(f"{BASE_URL}/portal/link/")
    assert link.expires_at == env.clock.now + 7 * 24 * 3600
    token = link.url.rsplit("/", 1)[1]
    (pending,) = await env.service.list_logins()
    assert (pending.user, pending.developer, pending.has_password) == ("carol", "acme", False)
    with pytest.raises(BadCredentials):  # no password yet: same answer as a wrong one
        await env.service.authenticate("carol@example.com", "", client="10.0.0.1")
    assert await env.service.peek_link(token) == link
    with pytest.raises(WeakPassword):  # a refused password leaves the link usable
        await env.service.redeem_link(token, "short")
    login = await env.service.redeem_link(token, PASSWORD)
    assert login.has_password and login.verified and login.user == "carol" and login.developer == "acme"
    assert await env.service.peek_link(token) is None
    with pytest.raises(LinkInvalid):
        await env.service.redeem_link(token, "another good password")
    await env.service.authenticate("carol@example.com", PASSWORD, client="10.0.0.1")
    stored = await env.spec.fetchval("SELECT COUNT(*) FROM login_links WHERE token_hash = ?", token)
    assert stored == 0


async def test_an_invite_link_expires_after_seven_days(env: LoginsEnv) -> None:
    await env.ledger.create_user("carol")
    link = await env.service.invite("carol@example.com", user="carol")
    env.clock.advance(7 * 24 * 3600)
    token = link.url.rsplit("/", 1)[1]
    assert await env.service.peek_link(token) is None
    with pytest.raises(LinkInvalid):
        await env.service.redeem_link(token, PASSWORD)


async def test_an_invite_names_accounts_that_exist(env: LoginsEnv) -> None:
    with pytest.raises(AccountNotFound):
        await env.service.invite("carol@example.com", user="carol")
    with pytest.raises(AccountNotFound):
        await env.service.invite("carol@example.com", developer="acme")
    assert await env.service.list_logins() == []


async def test_an_invite_without_accounts_creates_the_user_account_unless_signup_is_closed(env: LoginsEnv) -> None:
    link = await env.service.invite("dave@example.com")
    assert (await env.ledger.get_account(AccountKind.USER, "dave@example.com")).balance == 0
    assert link.email == "dave@example.com"
    closed = env.make(signup="closed")
    await closed.open()
    with pytest.raises(AccountNotFound):
        await closed.invite("erin@example.com")


async def test_an_operator_invite_resets_a_forgotten_password_and_enables_the_login(env: LoginsEnv) -> None:
    login = await env.service.signup("alice@example.com", PASSWORD)
    token, _ = await env.service.open_session(login)
    await env.service.disable("alice@example.com")
    first = await env.service.invite("alice@example.com")
    second = await env.service.invite("alice@example.com")
    (listed,) = await env.service.list_logins()
    assert not listed.disabled and listed.user == "alice@example.com"
    await env.service.redeem_link(second.url.rsplit("/", 1)[1], "my new password!")
    with pytest.raises(LinkInvalid):  # setting a password uses up the other invite and reset links
        await env.service.redeem_link(first.url.rsplit("/", 1)[1], "yet another password")
    assert await env.service.session(token) is None
    await env.service.authenticate("alice@example.com", "my new password!", client="10.0.0.1")


async def test_without_smtp_a_reset_request_sends_nothing_and_says_nothing(env: LoginsEnv) -> None:
    await env.service.signup("alice@example.com", PASSWORD)
    assert await env.service.request_reset("alice@example.com") is None
    assert await env.service.request_reset("nobody@example.com") is None
    assert await env.spec.fetchval("SELECT COUNT(*) FROM login_links") == 0


async def test_a_link_token_that_is_not_ours_is_invalid(env: LoginsEnv) -> None:
    for token in ("", "x" * 43, "y" * 5000):
        assert await env.service.peek_link(token) is None
        with pytest.raises(LinkInvalid):
            await env.service.redeem_link(token, PASSWORD)


async def test_the_migrations_are_recorded_with_the_concern_prefix(env: LoginsEnv) -> None:
    assert await env.service.store.applied_migrations() == ["logins_0001_initial"]
    again = env.make()
    await again.open()  # a second opening applies nothing twice
    count = await env.spec.fetchval("SELECT COUNT(*) FROM schema_migrations WHERE name = ?", "logins_0001_initial")
    assert count == 1


async def test_a_flood_of_password_hashes_never_takes_the_default_executor_that_dns_lookups_use() -> None:
    """Sign-ups and sign-ins are unauthenticated and each costs an argon2 hash: queued behind the
    hashing threads, they must not hold up the loop's default executor (aiohttp resolves upstream
    host names there), nor run more than HASH_THREADS hashes (64 MiB each) at once."""
    release = threading.Event()
    started = threading.Semaphore(0)

    class Stuck(PasswordHasher):
        def hash(self, password: str | bytes, *, salt: bytes | None = None) -> str:
            started.release()
            release.wait(timeout=30)
            return "stuck"

    passwords = Passwords(Stuck())
    loop = asyncio.get_running_loop()
    waiter = ThreadPoolExecutor(max_workers=1)  # waits for the hashes without the default executor
    flood = [asyncio.create_task(passwords.hash(f"password {n}")) for n in range(40)]
    try:
        for _ in range(HASH_THREADS):  # the hashing threads are busy ...
            assert await loop.run_in_executor(waiter, lambda: started.acquire(timeout=10))
        # ... and the default executor still answers at once
        assert await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 80), timeout=5)
        assert not started.acquire(blocking=False)  # no third hash ran meanwhile
    finally:
        release.set()
        assert await asyncio.gather(*flood) == ["stuck"] * 40
        passwords.close()
        waiter.shutdown()
