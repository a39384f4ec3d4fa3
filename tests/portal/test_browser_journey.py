"""The portal in a real browser: Debian's Chromium (``/usr/bin/chromium``, installed by ``.ci/run``),
driven headless by Playwright. A new user signs up, reads the price in the catalog, creates a key,
the official ``mcp`` SDK client pays for a call with it over real HTTP, the dashboard shows the lower
balance and the charge, the key is revoked in the browser and the next call is refused with 401.

A screenshot of every page is written to the test's folder (and to ``$PORTAL_SCREENSHOTS`` when set);
the step timings are printed."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.harness import mcp_client
from tests.portal.harness import PASSWORD, run_portal
from tests.upstream_sdk import run_upstream

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("the browser journey needs Debian's chromium: apt-get install -y chromium chromium-driver")
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Steps:
    """Times each step of the journey and keeps its screenshot."""

    def __init__(self, page: Page, folder: Path) -> None:
        self.page = page
        self.folder = folder
        self.timings: list[tuple[str, float]] = []
        self._start = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        self.timings.append((step, now - self._start))
        self._start = now

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(self.folder / f"{name}.png"), full_page=True)

    def report(self) -> str:
        lines = [f"  {step:<48} {seconds * 1000:8.0f} ms" for step, seconds in self.timings]
        total = sum(s for _, s in self.timings)
        return "\n".join(["portal journey (Chromium, headless):", *lines, f"  {'total':<48} {total * 1000:8.0f} ms"])


async def mcp_status(url: str, key: str) -> int:
    """The HTTP status a bare tools/call with ``key`` gets from the gateway."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_forecast", "arguments": {}}}
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        return resp.status


async def test_a_new_user_signs_up_buys_a_call_with_a_new_key_and_revokes_it_in_a_real_browser(
    browser: Browser, tmp_path: Path
) -> None:
    shots = tmp_path / "screenshots"
    shots.mkdir()
    async with run_upstream() as upstream:
        async with run_portal(tmp_path, {"weather": upstream.url}) as portal:
            context = await browser.new_context(viewport={"width": 1100, "height": 800})
            page = await context.new_page()
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))  # the revoke confirmation
            steps = Steps(page, shots)
            gw = portal.gw

            # 1. sign up: / → /portal/ → the sign-in page, which links to the sign-up form
            await page.goto(portal.url("/"))
            assert page.url == portal.url("/portal/login")
            await page.get_by_role("link", name="Sign up").first.click()
            await page.fill("input[name=email]", "alice@example.com")
            await page.fill("input[name=password]", PASSWORD)
            await steps.shot("1-signup")
            await page.click("form[data-testid=signup-form] button[type=submit]")
            await page.wait_for_url(portal.url("/portal/"))
            balance = page.locator("[data-testid=available-balance]")
            assert await balance.get_attribute("data-cents") == "0"
            steps.done("sign up (form → dashboard)")

            # the operator tops the new account up (money in through a payment provider is the next issue)
            await gw.ops.topup("alice@example.com", "100")

            # 2. the catalog shows the priced tool and its price
            await page.click("nav >> text=Servers")
            await page.wait_for_url(portal.url("/portal/servers"))
            forecast = page.locator("[data-testid=catalog-item][data-name=get_forecast]")
            assert await forecast.locator("[data-testid=price]").get_attribute("data-cents") == "5"
            assert "5¢ per call" in await forecast.inner_text()
            await steps.shot("2-catalog")
            steps.done("catalog (upstream listed, priced)")

            # 3. create a key: shown once, with the client set-up
            await page.click("nav >> text=API keys")
            await page.select_option("select[name=server]", "weather")
            await page.fill("input[name=name]", "laptop")
            await page.fill("input[name=spend_limit_cents]", "50")
            await page.click("form[data-testid=new-key-form] button[type=submit]")
            key = (await page.locator("[data-testid=new-key]").inner_text()).strip()
            assert key.startswith("ap_")
            assert "claude mcp add" in await page.content()
            await steps.shot("3-new-key")
            steps.done("create a key")

            # 4. the official MCP SDK client pays for a call with it, over real HTTP
            async with mcp_client(gw.url(), key) as client:
                result = await client.call_tool("get_forecast", {"city": "Paris"})
            assert not result.is_error and result.content[0].text == "Sunny in Paris"  # type: ignore[union-attr]
            await gw.settled()
            steps.done("MCP SDK client: initialize + priced tools/call")

            # 5. the dashboard shows the lower balance and the charge
            await page.goto(portal.url("/portal/"))
            assert await balance.get_attribute("data-cents") == "95"
            (charge,) = await gw.ledger.list_charges(user="alice@example.com")
            row = page.locator(f"[data-testid=charge-row][data-charge-id='{charge.id}']")
            assert await row.get_attribute("data-cents") == "5"
            today = page.locator("#spend-chart-title")
            assert "5¢" in (await today.text_content() or "")
            await steps.shot("4-dashboard")
            steps.done("dashboard shows 95¢ and the charge")

            # 6. revoke in the browser (after the confirmation); the next call gets 401
            await page.goto(portal.url("/portal/keys"))
            (record,) = await gw.ops.list_keys("alice@example.com")
            assert key.startswith(record["prefix"])
            key_row = page.locator(f"[data-testid=key-row][data-key-prefix='{record['prefix']}']")
            await key_row.locator("form[data-testid=revoke-form] button").click()
            await page.wait_for_url(portal.url("/portal/keys?done=revoked"))
            assert await page.locator("[data-testid=revoked]").is_visible()
            await steps.shot("5-revoked")
            steps.done("revoke in the browser")
            assert await mcp_status(gw.url(), key) == 401
            steps.done("next call refused (401)")

            # the account page (change password, sign out everywhere), for its screenshot
            await page.click("nav >> text=Account")
            assert await page.locator("form[data-testid=password-form]").is_visible()
            await steps.shot("6-account")

            # the developer's side, for its screenshot
            link = await gw.rt.logins.invite("dev@acme.example", developer="acme")
            dev = await context.new_page()
            await context.clear_cookies()
            await dev.goto(link.url)
            await dev.fill("input[name=password]", "developer password")
            await dev.click("form[data-testid=link-form] button[type=submit]")
            await dev.wait_for_url(portal.url("/portal/developer"))
            assert await dev.locator("[data-testid=earnings]").get_attribute("data-cents") == "5"
            await dev.screenshot(path=str(shots / "7-developer.png"), full_page=True)
            steps.done("developer: invite link → earnings")
            await context.close()
            await gw.verify_clean()
    print("\n" + steps.report())
    (shots / "timings.txt").write_text(steps.report() + "\n")
    keep = os.environ.get("PORTAL_SCREENSHOTS")
    if keep:
        shutil.copytree(shots, keep, dirs_exist_ok=True)
