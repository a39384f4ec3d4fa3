"""mcp-remote (what Claude Desktop users run) connects to a priced server by URL alone: it registers,
prints the authorization URL and waits on its localhost callback; a real browser (Debian's Chromium,
driven headless by Playwright) signs in to the portal and approves; the priced call is charged once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from playwright.async_api import async_playwright

from gateway.money import parse_cents
from tests.clients.npm import NodeTools, NpmUnavailable, ensure_installed
from tests.oauth.flow import new_person, run_oauth_portal
from tests.portal.harness import PASSWORD
from tests.process import free_port
from tests.upstream_sdk import run_upstream

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.timeout(300)  # the first run may install the npm packages
_AUTHORIZE_URL = re.compile(r"(https?://\S+/oauth/authorize\?\S+)")


@pytest.fixture(scope="module")
def node() -> NodeTools:
    try:
        return ensure_installed()
    except NpmUnavailable as exc:
        pytest.fail(f"mcp-remote comes from the npm registry: {exc}")


@asynccontextmanager
async def mcp_remote(node: NodeTools, home: Path, url: str, callback_port: int) -> AsyncIterator[Client]:
    """The official Python client over stdio to `npx mcp-remote URL PORT` (no key: OAuth)."""
    argv = node.npx("mcp-remote", url, str(callback_port))
    env = node.env(HOME=str(home), BROWSER="true")  # xdg-open runs `true URL`: the test drives the browser
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=env, cwd=str(node.root))
    with (home / "mcp-remote.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:  # type: ignore[arg-type]
            yield client


async def authorization_url(log: Path, timeout_s: float = 60) -> str:
    """The URL mcp-remote asks the user to open, once it has written it to its log."""
    async with asyncio.timeout(timeout_s):
        while True:
            found = _AUTHORIZE_URL.search(log.read_text(errors="replace")) if log.exists() else None
            if found:
                return found.group(1)
            await asyncio.sleep(0.05)  # polling a file another process writes; bounded by the timeout


async def test_mcp_remote_connects_by_url_a_browser_approves_and_the_call_is_charged_once(
    node: NodeTools, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.fail("this test needs Debian's chromium: apt-get install -y chromium")
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            person = await new_person(portal, "gina@example.com", "100")
            await person.visitor.http.close()
            port = free_port()
            home = tmp_path / "home"
            home.mkdir()

            async def use() -> str:
                async with mcp_remote(node, home, portal.url("/weather/mcp"), port) as client:
                    result = await client.call_tool("get_forecast", {"city": "Lima"})
                    assert not result.is_error
                    return str(result.content[0].text)  # type: ignore[union-attr]

            using = asyncio.create_task(use())
            url = await authorization_url(home / "mcp-remote.log")
            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                try:
                    page = await browser.new_page()
                    await page.goto(url)
                    await page.wait_for_url(re.compile(r".*/portal/login\?next=.*"))
                    await page.fill("#email", "gina@example.com")
                    await page.fill("#password", PASSWORD)
                    await page.click("[data-testid=login-form] button[type=submit]")
                    await page.wait_for_url(re.compile(r".*/portal/oauth/consent\?.*"))
                    assert await page.text_content("[data-testid=consent-server]") == "weather"
                    await page.fill("[data-testid=consent-spend-limit]", "20")
                    await page.click("[data-testid=consent-approve]")
                    await page.wait_for_url(
                        re.compile(rf"http://(localhost|127\.0\.0\.1):{port}/oauth/callback\?code=.*")
                    )
                    await page.screenshot(path=str(tmp_path / "callback.png"))
                finally:
                    await browser.close()
            async with asyncio.timeout(90):
                assert await using == "Sunny in Lima"
            await portal.gw.settled()
            assert await portal.gw.balance("gina@example.com") == parse_cents("95")
            assert upstream.log.completed == ["get_forecast"]
            keys = await portal.gw.ledger.list_keys("gina@example.com")
            assert [(k.spend_limit, k.spent) for k in keys] == [(parse_cents("20"), parse_cents("5"))]
