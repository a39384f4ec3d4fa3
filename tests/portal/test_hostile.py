"""What a hostile visitor tries against the portal's routes as a whole: every POST without its CSRF
token, spoofed client addresses and other spellings of an e-mail against the throttle, and a one-time
link's token written another way into the request log."""

from __future__ import annotations

import time
from pathlib import Path

from structlog.testing import capture_logs

from gateway.config import load_config
from gateway.logins.throttle import Throttle
from gateway.portal.app import portal_app
from tests.oauth.flow import new_person, register, run_oauth_portal
from tests.portal.harness import PASSWORD, Portal, Visitor


def post_routes(portal: Portal) -> list[str]:
    """Every POST route of the portal, its ids filled with a made-up one."""
    app = portal_app(load_config(portal.gw.config_path))
    paths = []
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter", "")
        if route.method == "POST":
            paths.append(
                "/portal"
                + path.replace("{key_id}", "key_x")
                .replace("{charge_id}", "chg_x")
                .replace("{token_id}", "tok_x")
                .replace("{token}", "t" * 43)
                .replace("{grant_id}", "gnt_x")
            )
    return paths


async def test_every_post_route_of_the_portal_refuses_a_form_without_its_csrf_token(tmp_path: Path) -> None:
    async with run_oauth_portal(tmp_path, {"weather": None}) as portal:  # the OAuth pages' routes too
        await every_post_refused_without_csrf(portal)


async def every_post_refused_without_csrf(portal: Portal) -> None:
    paths = post_routes(portal)
    assert {"/portal/keys", "/portal/topup", "/portal/developer/payout", "/portal/login"} <= set(paths)
    link = await portal.gw.rt.logins.invite("dev@example.com", developer="acme")
    async with Visitor(portal) as signed_out:
        for path in paths:
            status, _, _ = await signed_out.post(path, {"email": "x@example.com", "password": PASSWORD}, csrf="")
            assert status in (303, 403), (path, status)  # signed-out forms: 403; the rest send to sign in
    async with Visitor(portal) as v:
        await v.sign_up("user@example.com")
        status, _, _ = await v.form(link.url.removeprefix(portal.base), {"password": PASSWORD})
        assert status == 303  # signed in as the invited developer (a user account too)
        await v.get("/portal/account")
        for path in paths:
            status, _, _ = await v.post(path, {"server": "weather", "amount_cents": "500"}, csrf="")
            assert status == 403, (path, status)
        assert (await v.get("/portal/account"))[0] == 200  # still signed in: nothing was done
    assert await portal.gw.ops.list_tokens("acme") == [] and await portal.gw.ops.list_keys("user@example.com") == []


async def test_x_forwarded_for_from_an_untrusted_peer_and_other_spellings_of_an_email_get_no_new_tries(
    portal: Portal,
) -> None:
    logins = portal.gw.rt.logins
    logins.throttle = Throttle(logins.store, time.time, per_account=2, per_address=4)
    async with Visitor(portal) as v:
        statuses = []
        for n in range(5):  # spraying: a new e-mail and a new claimed address each time
            await v.get("/portal/login")
            async with v.http.post(
                portal.url("/portal/login"),
                data={"email": f"victim{n}@example.com", "password": "wrong password", "csrf_token": v.csrf},
                headers={"X-Forwarded-For": f"203.0.113.{n}"},
                allow_redirects=False,
            ) as resp:
                statuses.append(resp.status)
        assert statuses == [401, 401, 401, 401, 429]
    logins.throttle = Throttle(logins.store, time.time, per_account=2, per_address=100)
    async with Visitor(portal) as v:
        await v.sign_up("eve@example.com")
        await v.post("/portal/logout")
        statuses = []
        for email in ("eve@example.com", " EVE@Example.COM", "Eve@example.com\t"):
            statuses.append(await v.sign_in(email, "not the password"))
        assert statuses == [401, 401, 429]


async def test_a_link_token_written_with_percent_escapes_never_reaches_the_request_log(portal: Portal) -> None:
    await portal.gw.ops.create_user("carol", "0")
    link = await portal.gw.rt.logins.invite("carol@example.com", user="carol")
    token = link.url.rsplit("/", 1)[1]
    with capture_logs() as captured:
        async with Visitor(portal) as v:
            for path in (f"/portal/%6Cink/{token}", f"/portal/link/{token}/", f"/%70ortal/link/{token}"):
                await v.get(path)
    paths = [entry.get("path") for entry in captured if entry.get("event") == "request"]
    assert paths == ["/portal/link/<redacted>"] * 3
    assert token not in repr(captured)


async def test_markup_in_a_registered_client_name_is_inert_on_the_consent_and_connections_pages(
    tmp_path: Path,
) -> None:
    evil = '"><img src=x onerror=alert(1)>'
    async with run_oauth_portal(tmp_path, {"weather": None}) as p:
        person = await new_person(p, "ann@example.com", "1")
        async with person.visitor:
            client = await register(p, client_name=evil, client_uri="javascript:alert(1)")
            await client.code(person, p.url("/weather/mcp"))
            _, page, _ = await person.visitor.get("/portal/connections")
            assert "<img" not in page and "&lt;img src=x" in page
            fields = await person.consent_form(client.authorize_url(p.url("/weather/mcp")))
            assert fields["client_id"] == client.client_id
            async with person.visitor.http.get(client.authorize_url(p.url("/weather/mcp"))) as resp:
                text = await resp.text()
            assert "<img" not in text and "javascript:" not in text


async def test_a_signed_in_person_can_use_a_one_time_link_opened_in_the_same_browser(portal: Portal) -> None:
    """The link's page carries the session's form token then; the form must take it (it was refused 403)."""
    link = await portal.gw.rt.logins.invite("dev@example.com", developer="acme")
    async with Visitor(portal) as v:
        await v.sign_up("someone@example.com")
        status, _, resp = await v.form(link.url.removeprefix(portal.base), {"password": PASSWORD})
        assert status == 303 and resp.headers["Location"] == portal.url("/portal/")
        status, page, _ = await v.get("/portal/developer")
        assert status == 200 and "dev@example.com" in page
        status, _, _ = await v.form("/portal/reset", {"email": "dev@example.com"})
        assert status == 200


async def test_signing_in_never_follows_a_next_that_leaves_the_portal_or_splits_the_header(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("nina@example.com")
        await v.post("/portal/logout")
        for evil in (
            "//evil.example/x",
            "https://evil.example/",
            "/portal\\@evil.example",
            "/portal/\r\nSet-Cookie: agentpay_session=planted",
            "/portal/%0d%0aLocation:%20https://evil.example",
            "/portal//evil.example/",
        ):
            status, _, resp = await v.form(
                "/portal/login", {"email": "nina@example.com", "password": PASSWORD, "next": evil}
            )
            assert status == 303, evil
            location = resp.headers["Location"]
            assert location.startswith(portal.url("/portal/")) and "\n" not in location, (evil, location)
            assert "planted" not in resp.headers.getall("Set-Cookie", [""])[0]
            await v.get("/portal/account")
            await v.post("/portal/logout")


async def test_a_login_not_yet_confirmed_is_told_so_on_the_sign_in_form_after_the_right_password_only(
    portal: Portal,
) -> None:
    portal.gw.rt.logins.mail_enabled = True  # as with `smtp:` (no mail server needed: none is sent here)
    await portal.gw.rt.logins.signup("squat@example.com", PASSWORD)
    async with Visitor(portal) as v:
        status, page, _ = await v.form("/portal/login", {"email": "squat@example.com", "password": "wrong password"})
        assert status == 401 and "Confirm your e-mail" not in page
        status, page, _ = await v.form("/portal/login", {"email": "squat@example.com", "password": PASSWORD})
        assert status == 403 and "Confirm your e-mail address first" in page
        assert v.cookie("agentpay_session") is None
