"""Sign-up, sign-in, sign-out, one-time links and resets, as HTTP forms: each form and its failures."""

from __future__ import annotations

import re
from pathlib import Path

from structlog.testing import capture_logs
from yarl import URL

from gateway.ledger.base import AccountKind
from tests.portal.harness import PASSWORD, Portal, Visitor, run_portal

LOGIN_ERROR = "That e-mail address and password do not match an account."


async def test_root_and_portal_without_slash_redirect_to_the_portal(portal: Portal) -> None:
    async with Visitor(portal) as v:
        for path in ("/", "/portal"):
            status, _, resp = await v.get(path)
            assert status in (302, 303)
            assert resp.headers["Location"] == portal.url("/portal/")


async def test_signing_up_creates_a_user_account_named_after_the_email_with_zero_balance(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("Alice@Example.com")
        account = await portal.gw.ledger.get_account(AccountKind.USER, "alice@example.com")
        assert account.balance == 0
        status, page, _ = await v.get("/portal/")
        assert status == 200
        assert 'data-testid="available-balance" data-cents="0"' in page
        assert "alice@example.com" in page


async def test_the_session_cookie_is_httponly_and_samesite_lax_on_the_portal_path(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("c@example.com")
        await v.post("/portal/logout")
        await v.get("/portal/login")
        _, _, resp = await v.post("/portal/login", {"email": "c@example.com", "password": PASSWORD})
        cookie = next(c for c in resp.headers.getall("Set-Cookie") if c.startswith("agentpay_session="))
        lowered = cookie.lower()
        assert "httponly" in lowered and "samesite=lax" in lowered and "path=/portal" in lowered
        assert "secure" not in lowered  # base_url is http here; https turns it on


async def test_signing_in_with_a_wrong_password_or_an_unknown_email_gets_the_same_answer(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("dora@example.com")
        await v.post("/portal/logout")
    answers = []
    for email in ("dora@example.com", "nobody@example.com"):
        async with Visitor(portal) as v:
            status, page, _ = await v.form("/portal/login", {"email": email, "password": "wrong password!"})
            answers.append((status, re.sub(r'value="[^"]*"', "", page)))
            assert v.cookie("agentpay_session") is None
    assert answers[0][0] == answers[1][0] == 401
    assert LOGIN_ERROR in answers[0][1]
    assert answers[0][1] == answers[1][1]


async def test_too_many_failed_sign_ins_are_answered_429_with_retry_after(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("eve@example.com")
        await v.post("/portal/logout")
        statuses = []
        for _ in range(10):
            status, page, resp = await v.form("/portal/login", {"email": "eve@example.com", "password": "not it, no"})
            statuses.append(status)
            if status == 429:
                assert int(resp.headers["Retry-After"]) > 0
                assert "Too many attempts" in page
                break
        assert statuses[0] == 401 and statuses[-1] == 429
        # Throttled means throttled: the right password is refused too until the window passes.
        assert await v.sign_in("eve@example.com") == 429


async def test_a_form_without_or_with_a_wrong_csrf_token_is_refused_403(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.get("/portal/signup")
        for token in ("", "forged-token-forged-token-forged-token"):
            status, page, _ = await v.post(
                "/portal/signup", {"email": "f@example.com", "password": PASSWORD}, csrf=token
            )
            assert status == 403
            assert 'data-code="forbidden"' in page
        await v.sign_up("f@example.com")
        for path in ("/portal/keys", "/portal/logout", "/portal/account/sessions/close"):
            status, _, _ = await v.post(path, {"server": "weather"}, csrf="")
            assert status == 403, path
        # a signed-out form's token is not a session's token either
        status, _, _ = await v.post("/portal/keys", {"server": "weather"}, csrf=v.cookie("agentpay_csrf") or "")
        assert status == 403
        assert await portal.gw.ops.list_keys("f@example.com") == []


async def test_signing_in_always_starts_a_session_the_server_made(portal: Portal) -> None:
    """Session fixation: a session id planted in the browser before sign-in is never the one signed in."""
    async with Visitor(portal) as v:
        await v.sign_up("g@example.com")
        first = v.cookie("agentpay_session")
    async with Visitor(portal) as v:
        planted = "attacker-chosen-session-token-0123456789"
        v.http.cookie_jar.update_cookies({"agentpay_session": planted}, response_url=_url(portal))
        assert await v.sign_in("g@example.com") == 303
        second = v.cookie("agentpay_session")
        assert second and second not in (planted, first)
        assert await portal.gw.rt.logins.session(planted) is None
        status, _, _ = await v.get("/portal/")
        assert status == 200


def _url(portal: Portal) -> URL:
    return URL(portal.url("/portal/"))


async def test_signing_out_ends_the_session(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("h@example.com")
        token = v.cookie("agentpay_session")
        status, _, resp = await v.post("/portal/logout")
        assert status == 303 and resp.headers["Location"] == portal.url("/portal/login")
        assert await portal.gw.rt.logins.session(token or "") is None
        status, _, _ = await v.get("/portal/keys")
        assert status == 303


async def test_signing_out_everywhere_ends_every_session_of_the_login(portal: Portal) -> None:
    async with Visitor(portal) as one, Visitor(portal) as two:
        await one.sign_up("i@example.com")
        assert await two.sign_in("i@example.com") == 303
        await one.get("/portal/account")
        status, _, _ = await one.post("/portal/account/sessions/close")
        assert status == 303
        assert (await two.get("/portal/"))[0] == 303
        assert (await one.get("/portal/"))[0] == 303


async def test_changing_the_password_needs_the_current_one_and_signs_out_other_sessions(portal: Portal) -> None:
    async with Visitor(portal) as one, Visitor(portal) as two:
        await one.sign_up("j@example.com")
        assert await two.sign_in("j@example.com") == 303
        await one.get("/portal/account")
        status, page, _ = await one.post(
            "/portal/account/password", {"current_password": "not the one", "new_password": "a new password 2"}
        )
        assert status == 401 and "The current password is wrong." in page
        status, _, resp = await one.post(
            "/portal/account/password", {"current_password": PASSWORD, "new_password": "a new password 2"}
        )
        assert status == 303 and resp.headers["Location"] == portal.url("/portal/account?done=password")
        assert (await one.get("/portal/account"))[0] == 200  # this browser has a new session
        assert (await two.get("/portal/"))[0] == 303
        assert await two.sign_in("j@example.com", "a new password 2") == 303


async def test_an_invite_link_sets_the_password_once_and_cannot_be_used_twice(portal: Portal) -> None:
    await portal.gw.ops.create_user("bob", "100")
    link = await portal.gw.rt.logins.invite("bob@example.com", user="bob")
    path = link.url.removeprefix(portal.base)
    assert path.startswith("/portal/link/")
    async with Visitor(portal) as v, Visitor(portal) as again:
        status, page, resp = await v.get(path)
        assert status == 200 and "bob@example.com" in page
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        assert (await again.get(path))[0] == 200  # a second browser has the form open too
        status, _, resp = await v.post(path, {"password": "bob's own password"})
        assert status == 303 and resp.headers["Location"] == portal.url("/portal/")
        status, page, _ = await v.get("/portal/")
        assert 'data-testid="available-balance" data-cents="100"' in page
        status, page, _ = await again.post(path, {"password": "someone else's pw"})
        assert status == 404 and 'data-testid="link-invalid"' in page
        status, page, _ = await again.get(path)
        assert status == 404 and 'data-testid="link-invalid"' in page
        assert await again.sign_in("bob@example.com", "someone else's pw") == 401
        assert await again.sign_in("bob@example.com", "bob's own password") == 303


async def test_a_password_reset_request_answers_the_same_for_known_and_unknown_addresses(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("k@example.com")
        await v.post("/portal/logout")
    pages = []
    for email in ("k@example.com", "nobody@example.com"):
        async with Visitor(portal) as v:
            status, page, _ = await v.form("/portal/reset", {"email": email})
            assert status == 200 and 'data-testid="reset-sent"' in page
            pages.append(re.sub(r'value="[^"]*"', "", page))
    assert pages[0] == pages[1]


async def test_a_weak_password_is_refused_next_to_the_form(portal: Portal) -> None:
    async with Visitor(portal) as v:
        status, page, _ = await v.form("/portal/signup", {"email": "l@example.com", "password": "short"})
        assert status >= 400 and 'data-testid="form-error"' in page
        assert 'value="l@example.com"' in page


async def test_sign_up_by_invitation_only_refuses_the_form(tmp_path: Path) -> None:
    async with run_portal(tmp_path, {"weather": None}, signup="invite") as invite_only:
        async with Visitor(invite_only) as v:
            status, page, _ = await v.get("/portal/signup")
            assert status == 200 and 'data-testid="signup-closed"' in page
            status, _, _ = await v.post("/portal/signup", {"email": "m@example.com", "password": PASSWORD})
            assert status == 403
            assert await invite_only.gw.rt.logins.list_logins() == []


async def test_a_link_token_never_reaches_the_request_log(portal: Portal) -> None:
    await portal.gw.ops.create_user("carol", "0")
    link = await portal.gw.rt.logins.invite("carol@example.com", user="carol")
    token = link.url.rsplit("/", 1)[1]
    with capture_logs() as captured:
        async with Visitor(portal) as v:
            await v.get(link.url.removeprefix(portal.base))
            await v.post(link.url.removeprefix(portal.base), {"password": "carol's password"})
    paths = [entry.get("path") for entry in captured if entry.get("event") == "request"]
    assert paths == ["/portal/link/<redacted>", "/portal/link/<redacted>"]
    assert token not in repr(captured)


async def test_behind_https_the_session_cookie_is_secure_and_redirects_use_the_base_url(tmp_path: Path) -> None:
    async with run_portal(tmp_path, {"weather": None}, base_url="https://portal.example.com") as behind_tls:
        async with Visitor(behind_tls) as v:
            _, _, resp = await v.get("/portal/signup")
            csrf_cookie = next(c for c in resp.headers.getall("Set-Cookie") if c.startswith("agentpay_csrf="))
            assert "secure" in csrf_cookie.lower()
            token = csrf_cookie.split(";")[0].split("=", 1)[1]
            async with v.http.post(
                behind_tls.url("/portal/signup"),
                data={"email": "tls@example.com", "password": PASSWORD, "csrf_token": token},
                headers={"Cookie": f"agentpay_csrf={token}"},
                allow_redirects=False,
            ) as resp:
                assert resp.status == 303
                assert resp.headers["Location"] == "https://portal.example.com/portal/"
                session = next(c for c in resp.headers.getall("Set-Cookie") if c.startswith("agentpay_session="))
                assert "secure" in session.lower() and "httponly" in session.lower()
