"""The portal under test: a real gateway listening on a loopback port (its ``portal.base_url`` is that
address, so the portal's redirects land on it), a real SDK upstream behind it, and an HTTP client with
a cookie jar that reads each form's CSRF token the way a browser sends it back."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.app import create_app, server_options
from gateway.config import load_config
from tests.harness import Gateway, GatewayTestServer, prepare_ledger, write_config
from tests.process import free_port

PRICES: dict[str, Any] = {
    "weather": {
        "tools": {"get_forecast": "5", "premium_*": "25", "echo": 0},
        "resources": {"weather://alerts/*": "1"},
        "prompts": {"daily_brief": "2"},
        "default": 0,
    }
}
_CSRF = re.compile(r'name="csrf_token" value="([^"]*)"')
PASSWORD = "correct horse battery"


@dataclass
class Portal:
    gw: Gateway
    base: str

    def url(self, path: str) -> str:
        return self.base + path


@asynccontextmanager
async def run_portal(
    tmp: Path,
    upstreams: Mapping[str, str | None],
    *,
    signup: str = "open",
    prices: dict[str, Any] | None = None,
    base_url: str | None = None,
    **top: Any,
) -> AsyncIterator[Portal]:
    """A gateway on a free loopback port with the portal at ``/portal/`` (sign-up ``signup``); its
    ``portal.base_url`` is that address unless ``base_url`` says otherwise (a TLS-terminating proxy's)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    path = write_config(
        tmp,
        dict(upstreams),
        prices if prices is not None else PRICES,
        listen=f"127.0.0.1:{port}",
        portal={"signup": signup, "base_url": base_url or base},
        key_cache_s=0,
        **top,
    )
    await prepare_ledger(path)
    config = load_config(path)
    server = GatewayTestServer(
        create_app(config), header_timeout_s=config.client_header_timeout_s, host="127.0.0.1", port=port
    )
    options = server_options(config)
    del options["handler_cancellation"]  # TestServer always sets it
    await server.start_server(**options)
    try:
        yield Portal(Gateway(path, server), base)
    finally:
        await server.close()


class Visitor:
    """One browser: a cookie jar, no automatic redirects, and the CSRF token of the last form seen."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.csrf = ""

    async def __aenter__(self) -> Visitor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.portal.url(path), allow_redirects=False) as resp:
            text = await resp.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return resp.status, text, resp

    async def post(
        self, path: str, fields: Mapping[str, str] | None = None, *, csrf: str | None = None
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        """POST a form; its csrf_token is the last one seen (``csrf=""``: none at all)."""
        data = dict(fields or {})
        token = self.csrf if csrf is None else csrf
        if token:
            data["csrf_token"] = token
        async with self.http.post(self.portal.url(path), data=data, allow_redirects=False) as resp:
            text = await resp.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return resp.status, text, resp

    async def form(
        self, path: str, fields: Mapping[str, str], *, page: str | None = None
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        """Open the page of the form (``page``, default ``path``) for its token, then send the form."""
        await self.get(page or path)
        return await self.post(path, fields)

    async def sign_up(self, email: str, password: str = PASSWORD) -> None:
        status, _, resp = await self.form("/portal/signup", {"email": email, "password": password})
        assert status == 303, status
        assert resp.headers["Location"] == self.portal.url("/portal/")
        await self.get("/portal/account")  # the signed-in forms' token

    async def sign_in(self, email: str, password: str = PASSWORD) -> int:
        status, _, _ = await self.form("/portal/login", {"email": email, "password": password})
        if status == 303:
            await self.get("/portal/account")  # the signed-in forms' token
        return status

    def cookie(self, name: str) -> str | None:
        for cookie in self.http.cookie_jar:
            if cookie.key == name:
                return cookie.value
        return None
