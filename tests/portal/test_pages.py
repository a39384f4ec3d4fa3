"""Keys, dashboard, catalog, developer page and CSV export as HTTP forms and pages: each form, its
failures, one user trying to reach another's keys and charges, and the numbers against the ledger's."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import aiohttp
import yaml
from mcp.server.mcpserver import MCPServer

from gateway.money import format_cents
from gateway.portal.exports import COLUMNS
from tests.harness import mcp_client
from tests.portal.harness import PRICES, Portal, Visitor, run_portal
from tests.process import free_port
from tests.upstream_sdk import run_upstream, serve_asgi

NEW_KEY = re.compile(r'data-testid="new-key" id="new-key">([^<]+)</pre>')


async def new_key(v: Visitor, **fields: str) -> str:
    await v.get("/portal/keys")
    status, page, _ = await v.post("/portal/keys", {"server": "weather", **fields})
    assert status == 200, page
    found = NEW_KEY.search(page)
    assert found, page
    return found.group(1)


async def call_forecast(portal: Portal, key: str, times: int = 1) -> None:
    async with mcp_client(portal.gw.url(), key) as client:
        for _ in range(times):
            result = await client.call_tool("get_forecast", {"city": "Paris"})
            assert not result.is_error
    await portal.gw.settled()


async def test_every_portal_answer_carries_the_security_headers(portal: Portal) -> None:
    async with Visitor(portal) as v:
        answers = [await v.get("/portal/login"), await v.get("/portal/nowhere"), await v.get("/portal/keys")]
        answers.append(await v.post("/portal/login", {"email": "x@example.com", "password": "y"}, csrf=""))
        for status, _, resp in answers:
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, status
            assert "form-action 'self'" in csp and "base-uri 'none'" in csp
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Referrer-Policy"] == "no-referrer"
            assert resp.headers["Cache-Control"] == "no-store"
        assert [a[0] for a in answers] == [200, 404, 303, 403]


async def test_pages_that_need_a_session_send_a_signed_out_visitor_to_sign_in(portal: Portal) -> None:
    async with Visitor(portal) as v:
        for path in ("/portal/", "/portal/keys", "/portal/developer", "/portal/account", "/portal/charges.csv"):
            status, _, resp = await v.get(path)
            assert status == 303 and resp.headers["Location"] == portal.url("/portal/login"), path


async def test_a_new_key_is_shown_once_with_client_setups_and_works_at_the_gateway(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("alice@example.com")
        await portal.gw.ops.topup("alice@example.com", "100")
        await v.get("/portal/keys")
        status, page, _ = await v.post(
            "/portal/keys", {"server": "weather", "spend_limit_cents": "50", "expires": "30d"}
        )
        assert status == 200
        key = NEW_KEY.search(page).group(1)  # type: ignore[union-attr]
        assert key.startswith("ap_")
        assert f"claude mcp add --transport http weather {portal.base}/weather/mcp" in page
        assert f"{portal.base}/k/{key}/weather/mcp" in page  # the connector URL
        assert "mcp-remote" in page and "mcpServers" in page
        await call_forecast(portal, key)
        status, page, _ = await v.get("/portal/keys")
        assert key not in page  # never shown again
        (row,) = await portal.gw.ops.list_keys("alice@example.com")
        assert f'data-testid="key-row" data-key-prefix="{row["prefix"]}"' in page
        assert row["spend_limit_cents"] == "50" and row["spent_cents"] == "5"
        assert 'data-cents="5"' in page


async def test_a_key_form_with_a_bad_limit_or_server_is_refused_next_to_the_form(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("bad@example.com")
        await v.get("/portal/keys")
        status, page, _ = await v.post("/portal/keys", {"server": "weather", "spend_limit_cents": "1.2345"})
        assert status == 400 and 'data-testid="form-error"' in page
        status, page, _ = await v.post("/portal/keys", {"server": "nope"})
        assert status == 404 and 'data-testid="form-error"' in page
        assert await portal.gw.ops.list_keys("bad@example.com") == []


async def test_a_second_user_can_neither_see_nor_revoke_the_first_users_key(portal: Portal) -> None:
    async with Visitor(portal) as alice, Visitor(portal) as mallory:
        await alice.sign_up("alice@example.com")
        await new_key(alice)
        (alice_key,) = await portal.gw.ops.list_keys("alice@example.com")
        await mallory.sign_up("mallory@example.com")
        status, page, _ = await mallory.get("/portal/keys")
        assert alice_key["prefix"] not in page and alice_key["id"] not in page
        status, page, _ = await mallory.post(f"/portal/keys/{alice_key['id']}/revoke")
        assert status == 404 and 'data-code="not_found"' in page
        status, _, _ = await mallory.post(f"/portal/keys/{alice_key['prefix']}/revoke")  # by prefix neither
        assert status == 404
        (still,) = await portal.gw.ops.list_keys("alice@example.com")
        assert still["revoked_at"] is None
        status, _, resp = await alice.post(f"/portal/keys/{alice_key['id']}/revoke")
        assert status == 303 and resp.headers["Location"] == portal.url("/portal/keys?done=revoked")
        (revoked,) = await portal.gw.ops.list_keys("alice@example.com")
        assert revoked["revoked_at"] is not None


async def test_names_and_emails_with_markup_are_rendered_inert(portal: Portal) -> None:
    async with Visitor(portal) as v:
        evil = '"><script>alert(1)</script>@example.com'
        status, page, _ = await v.form("/portal/signup", {"email": evil, "password": "long enough password"})
        assert status >= 400
        assert "<script>alert(1)</script>" not in page
        assert "&lt;script&gt;" in page or "&#34;&gt;&lt;script&gt;" in page
        await v.sign_up("obrien@example.com")
        await v.get("/portal/keys")
        status, page, _ = await v.post("/portal/keys", {"server": "weather", "name": "<img src=x onerror=alert(1)>"})
        assert status == 200
        assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


async def test_the_dashboard_numbers_equal_the_ledgers(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("dash@example.com")
        await portal.gw.ops.topup("dash@example.com", "100.5")
        key = await new_key(v)
        await call_forecast(portal, key, times=3)
        async with mcp_client(portal.gw.url(), key) as client:
            assert not (await client.call_tool("premium_report", {"city": "Oslo"})).is_error
        await portal.gw.settled()
        status, page, _ = await v.get("/portal/")
        assert status == 200
        shown = await portal.gw.ops.show_user("dash@example.com")
        assert shown["available_cents"] == "60.5"
        assert 'data-testid="available-balance" data-cents="60.5"' in page
        assert f'data-testid="balance" data-cents="{shown["balance_cents"]}"' in page
        # by server and tool: the rows of `agentpay usage`
        usage = await portal.gw.ops.usage(user="dash@example.com")
        rows = re.findall(
            r'data-testid="usage-row" data-server="([^"]+)" data-name="([^"]+)" data-cents="([^"]+)"', page
        )
        assert sorted(rows) == sorted((u["server"], u["name"], u["amount_cents"]) for u in usage)
        assert sorted(rows) == [("weather", "get_forecast", "15"), ("weather", "premium_report", "25")]
        # the chart's bars and its table carry the same per-day sums, and they add up to the usage total
        bars = re.findall(r'<g class="bar" data-day="([^"]+)" data-cents="([^"]+)"', page)
        table = re.findall(r'<tr data-day="([^"]+)" data-cents="([^"]+)">', page)
        assert len(bars) == 30 and bars == table[:30]
        total = sum(int(float(c) * 1000) for _, c in bars)  # test-side arithmetic only
        assert format_cents(total) == "40"
        charges = await portal.gw.ledger.list_charges(user="dash@example.com")
        assert [d for d, c in bars if c != "0"] == sorted({_day(c.created_at) for c in charges})
        for charge in charges:
            assert f'data-charge-id="{charge.id}"' in page  # receipts


def _day(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).date().isoformat()


async def test_the_csv_export_equals_the_ledgers_charges(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("csv@example.com")
        await portal.gw.ops.topup("csv@example.com", "100")
        await call_forecast(portal, await new_key(v), times=2)
        async with v.http.get(portal.url("/portal/charges.csv"), allow_redirects=False) as resp:
            assert resp.status == 200 and resp.content_type == "text/csv"
            assert "attachment" in resp.headers["Content-Disposition"]
            text = await resp.text()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert tuple(rows[0]) == COLUMNS
        charges = await portal.gw.ledger.list_charges(user="csv@example.com")
        assert [(r["id"], r["name"], r["amount_cents"], r["refunded_cents"]) for r in rows] == [
            (c.id, c.name, format_cents(c.amount), format_cents(c.refunded)) for c in charges
        ]
    async with Visitor(portal) as other:
        await other.sign_up("other@example.com")
        async with other.http.get(portal.url("/portal/charges.csv")) as resp:
            assert list(csv.DictReader(io.StringIO(await resp.text()))) == []


async def test_the_catalog_lists_the_upstreams_tools_with_live_prices(portal: Portal) -> None:
    async with Visitor(portal) as v:
        status, page, _ = await v.get("/portal/servers")  # public: read before signing up
        assert status == 200
        assert _price(page, "tool", "get_forecast") == "5"
        assert _price(page, "tool", "premium_report") == "25"  # by glob
        assert _price(page, "tool", "echo") == "0"
        assert _price(page, "resource", "weather://alerts/{region}") == "1"
        assert _price(page, "prompt", "daily_brief") == "2"
        prices = {"weather": {**PRICES["weather"], "tools": {"get_forecast": "7.25", "premium_*": "25", "echo": 0}}}
        (portal.gw.config_path.parent / "prices.yaml").write_text(yaml.safe_dump(prices))
        portal.gw.rt.prices.reload()  # what the file watcher (or SIGHUP) does; it may have done it already
        assert portal.gw.rt.prices.table.lookup("weather", "tool", "get_forecast") == 7250
        status, page, _ = await v.get("/portal/servers")
        assert _price(page, "tool", "get_forecast") == "7.25"


def _price(page: str, kind: str, name: str) -> str:
    pattern = rf'data-kind="{kind}" data-name="{re.escape(name)}">.*?data-testid="price" data-cents="([^"]+)"'
    found = re.search(pattern, page, re.S)
    assert found, f"{kind} {name} not in the catalog"
    return found.group(1)


async def test_an_upstream_that_is_down_is_shown_unavailable_with_its_price_rules(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    async with run_portal(tmp_path, {"weather": dead}) as portal:
        async with Visitor(portal) as v:
            status, page, _ = await v.get("/portal/servers")
            assert status == 200
            assert 'data-testid="server-unavailable"' in page
            assert 'data-testid="price-rule"' in page and "get_forecast" in page


async def test_a_developer_sees_earnings_refunds_a_charge_and_cannot_touch_another_developers(
    portal: Portal,
) -> None:
    gw = portal.gw
    await gw.ops.create_user("payer", "100")
    key = (await gw.ops.create_key(user="payer", server="weather"))["key"]
    await call_forecast(portal, key, times=2)
    acme = await gw.rt.logins.invite("dev@acme.example", developer="acme")
    rival = await gw.rt.logins.invite("dev@rival.example", developer="rival")
    async with Visitor(portal) as dev, Visitor(portal) as other:
        for visitor, link in ((dev, acme), (other, rival)):
            path = link.url.removeprefix(portal.base)
            await visitor.form(path, {"password": "developer password"})
        status, page, _ = await dev.get("/portal/developer")
        assert status == 200
        earned = await gw.ops.earnings("acme")
        assert f'data-testid="earnings" data-cents="{earned["earnings_cents"]}"' in page
        charges = await gw.ledger.list_charges(developer="acme")
        assert len(charges) == 2 and all(f'data-charge-id="{c.id}"' in page for c in charges)
        # another developer: neither sees nor refunds acme's charges
        status, page, _ = await other.get("/portal/developer")
        assert status == 200 and charges[0].id not in page
        status, _, _ = await other.post(f"/portal/developer/charges/{charges[0].id}/refund", {"idempotency_key": "x"})
        assert status == 404
        # the owner refunds, once even if the form is sent twice
        await dev.get("/portal/developer")
        form = {"idempotency_key": "same-form", "amount_cents": "2"}
        for _ in range(2):
            status, _, resp = await dev.post(f"/portal/developer/charges/{charges[0].id}/refund", form)
            assert status == 303 and resp.headers["Location"] == portal.url("/portal/developer?done=refunded")
        refunded = await gw.ledger.get_charge(charges[0].id)
        assert refunded.refunded == 2000
        assert await gw.balance("payer") == 100_000 - 10_000 + 2_000
        status, _, _ = await dev.post(f"/portal/developer/charges/{charges[0].id}/refund", {}, csrf="")
        assert status == 403


async def test_a_developer_creates_a_service_token_once_shown_and_revokes_it(portal: Portal) -> None:
    gw = portal.gw
    link = await gw.rt.logins.invite("dev@acme.example", developer="acme")
    async with Visitor(portal) as dev, Visitor(portal) as other:
        await dev.form(link.url.removeprefix(portal.base), {"password": "developer password"})
        await dev.get("/portal/developer")
        status, page, _ = await dev.post("/portal/developer/tokens", {"server": "weather"})
        assert status == 200
        token = re.search(r'data-testid="new-token" id="new-token">([^<]+)</pre>', page).group(1)  # type: ignore[union-attr]
        assert token.startswith("apst_")
        async with aiohttp.ClientSession() as http:
            async with http.get(portal.url("/v1/charges"), headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200
        (row,) = await gw.ops.list_tokens("acme")
        rival = await gw.rt.logins.invite("dev@rival.example", developer="rival")
        await other.form(rival.url.removeprefix(portal.base), {"password": "developer password"})
        await other.get("/portal/developer")
        assert (await other.post(f"/portal/developer/tokens/{row['id']}/revoke"))[0] == 404
        status, _, _ = await dev.post(f"/portal/developer/tokens/{row['id']}/revoke")
        assert status == 303
        assert (await gw.ops.list_tokens("acme"))[0]["revoked_at"] is not None


async def test_a_login_without_a_developer_account_has_no_developer_page(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("user@example.com")
        status, page, _ = await v.get("/portal/developer")
        assert status == 404 and 'data-code="not_found"' in page


async def test_markup_in_an_upstreams_tool_list_is_rendered_inert_in_the_catalog(tmp_path: Path) -> None:
    evil = MCPServer("evil")

    @evil.tool(name="steal", title="<img src=x onerror=alert('title')>", description="<script>alert('d')</script>")
    def steal() -> str:
        return "nothing"

    async with serve_asgi(evil.streamable_http_app(json_response=True)) as base:
        async with run_portal(tmp_path, {"weather": f"{base}/mcp"}) as portal:
            async with Visitor(portal) as v:
                status, page, _ = await v.get("/portal/servers")
    assert status == 200 and 'data-name="steal"' in page
    assert "<script>alert" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;d&#39;)&lt;/script&gt;" in page


async def test_the_catalog_describes_price_rules_by_argument_and_metered(tmp_path: Path) -> None:
    prices = {
        "weather": {
            "tools": {
                "get_forecast": {"price": "2", "by_argument": [{"when": {"city": "Paris"}, "price": "10"}]},
                "premium_*": {"metered": True, "max": "50", "price": "5"},
            },
            "default": 0,
        }
    }
    async with run_upstream() as upstream:
        async with run_portal(tmp_path, {"weather": upstream.url}, prices=prices) as portal:
            async with Visitor(portal) as v:
                _, page, _ = await v.get("/portal/servers")
    assert _price(page, "tool", "get_forecast") == "2"
    assert "2¢ per call; 10¢ when city = &#39;Paris&#39;" in page
    assert _price(page, "tool", "premium_report") == "0"
    assert "metered by the server, at most 50¢ a call; 5¢ when it reports nothing" in page
