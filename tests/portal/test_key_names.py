"""``/portal/keys``: a key's name (the new-key form's optional ``name``) and its last use on the keys
list — "never" until a call with it has been flushed (``proxy.auth``, every 30 s and on drain)."""

from __future__ import annotations

import re

from tests.harness import mcp_client
from tests.portal.harness import Portal, Visitor

NEW_KEY = re.compile(r'data-testid="new-key" id="new-key">([^<]+)</pre>')
LAST_USED = re.compile(r'data-testid="key-last-used"[^>]*>([^<]*)</td>')


async def _create(v: Visitor, fields: dict[str, str]) -> tuple[int, str]:
    await v.get("/portal/keys")
    status, page, _ = await v.post("/portal/keys", {"server": "weather", **fields})
    return status, page


async def test_a_named_key_is_listed_with_its_name_and_never_used_until_a_call_is_flushed(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("named@example.com")
        await portal.gw.ops.topup("named@example.com", "100")
        status, page = await _create(v, {"name": "  Laptop — Claude Desktop  "})
        assert status == 200, page
        assert "Your new key: Laptop — Claude Desktop</h1>" in page
        found = NEW_KEY.search(page)
        assert found, page
        key = found.group(1)
        (stored,) = await portal.gw.ops.list_keys("named@example.com")
        assert stored["name"] == "Laptop — Claude Desktop" and stored["last_used_at"] is None

        _, page, _ = await v.get("/portal/keys")
        assert '<span class="key-name" data-testid="key-name">Laptop — Claude Desktop</span>' in page
        assert LAST_USED.findall(page) == ["never"]

        async with mcp_client(portal.gw.url(), key) as client:
            assert not (await client.call_tool("get_forecast", {"city": "Paris"})).is_error
        await portal.gw.settled()
        _, page, _ = await v.get("/portal/keys")
        assert LAST_USED.findall(page) == ["never"]  # noted in memory, not yet written
        assert await portal.gw.rt.auth.flush_last_used() == 1
        _, page, _ = await v.get("/portal/keys")
        (stored,) = await portal.gw.ops.list_keys("named@example.com")
        shown = stored["last_used_at"].replace("T", " ").replace("+00:00", " UTC")
        assert LAST_USED.findall(page) == [shown]


async def test_markup_in_a_key_name_is_shown_as_text_on_the_new_key_page_and_the_list(portal: Portal) -> None:
    evil = '<img src=x onerror=alert(1)>"><script>alert(2)</script>'
    async with Visitor(portal) as v:
        await v.sign_up("xss@example.com")
        status, page = await _create(v, {"name": evil})
        assert status == 200, page
        (stored,) = await portal.gw.ops.list_keys("xss@example.com")
        assert stored["name"] == evil  # stored as given, escaped when shown
        _, listing, _ = await v.get("/portal/keys")
        for shown in (page, listing):
            assert "<img src=x" not in shown and "<script>alert(2)" not in shown
            assert "&lt;img src=x onerror=alert(1)&gt;&#34;&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in shown


async def test_a_key_name_too_long_or_with_control_characters_is_refused_next_to_the_form(portal: Portal) -> None:
    async with Visitor(portal) as v:
        await v.sign_up("badname@example.com")
        for bad, reason in (("n" * 101, "at most 100 characters"), ("line\x1bbreak", "printable characters")):
            status, page = await _create(v, {"name": bad})
            assert status == 400, page
            assert reason in page and 'data-testid="new-key-form"' in page
        assert await portal.gw.ops.list_keys("badname@example.com") == []
        status, _ = await _create(v, {"name": "   "})  # blank: a key without a name
        assert status == 200
        (stored,) = await portal.gw.ops.list_keys("badname@example.com")
        assert stored["name"] is None
