"""The OAuth flow driven for real: the official SDK's ``OAuthClientProvider`` as the client, and a
scripted person at a browser (an aiohttp client with a cookie jar) who signs in to the portal and
answers the consent form, exactly as the HTML asks."""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import httpx2
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from gateway.money import parse_cents
from tests.portal.harness import PASSWORD, Portal, Visitor, run_portal

_FORM = re.compile(r'<form method="post" action="/oauth/authorize".*?</form>', re.DOTALL)
_HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)">')
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never listened on: the scripted browser stops at the redirect


@asynccontextmanager
async def run_oauth_portal(tmp: Path, upstreams: Mapping[str, str | None], **top: Any) -> AsyncIterator[Portal]:
    """The portal's gateway with ``oauth.enabled`` (CIMD fetches allowed to 127.0.0.1)."""
    oauth = {"enabled": True, "client_metadata_hosts_allowed": ["127.0.0.1"], **top.pop("oauth", {})}
    async with run_portal(tmp, upstreams, oauth=oauth, **top) as portal:
        yield portal


class MemoryStorage:
    """The SDK's token storage, in memory."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class Person:
    """Someone with a portal account who approves (or denies) what their client asks."""

    portal: Portal
    visitor: Visitor
    email: str
    spend_limit_cents: str = ""
    decision: str = "approve"
    urls: list[str] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)

    async def redirect_handler(self, url: str) -> None:
        self.urls.append(url)

    async def callback_handler(self) -> AuthorizationCodeResult:
        location = await self.answer(self.urls[-1])
        query = parse_qs(urlsplit(location).query)
        if "code" not in query:
            raise AssertionError(f"no code in the redirect: {location}")
        return AuthorizationCodeResult(
            code=query["code"][0], state=query.get("state", [None])[0], iss=query.get("iss", [None])[0]
        )

    async def consent_form(self, authorize_url: str) -> dict[str, str]:
        """Follow the authorization URL to the consent page (signing in on the way) and read its form."""
        async with self.visitor.http.get(authorize_url, allow_redirects=False) as resp:
            assert resp.status == 303, (resp.status, await resp.text())
            consent = resp.headers["Location"]
        path = consent.removeprefix(self.portal.base)
        status, text, resp = await self.visitor.get(path)
        if status == 303:  # signed out: the portal's sign-in page, then back here
            login = resp.headers["Location"].removeprefix(self.portal.base)
            assert login.startswith("/portal/login?next=")
            status, _, _ = await self.visitor.get(login)
            fields = {"email": self.email, "password": PASSWORD, "next": path}
            status, _, resp = await self.visitor.post("/portal/login", fields)
            assert status == 303 and resp.headers["Location"] == consent, (status, resp.headers.get("Location"))
            status, text, resp = await self.visitor.get(path)
        assert status == 200, (status, text)
        form = _FORM.search(text)
        assert form is not None, text
        return {name: html.unescape(value) for name, value in _HIDDEN.findall(form.group(0))}

    async def post_consent(self, fields: Mapping[str, str]) -> tuple[int, str]:
        async with self.visitor.http.post(
            self.portal.url("/oauth/authorize"), data=dict(fields), allow_redirects=False
        ) as resp:
            return resp.status, resp.headers.get("Location", await resp.text())

    async def answer(self, authorize_url: str) -> str:
        """The redirect back to the client after answering the consent form."""
        fields = await self.consent_form(authorize_url)
        fields.update(decision=self.decision, spend_limit_cents=self.spend_limit_cents)
        status, location = await self.post_consent(fields)
        self.redirects.append(location)
        assert status == 303, (status, location)
        return location


async def new_person(portal: Portal, email: str, cents: str, **options: Any) -> Person:
    """A person who signed up on the portal (their ledger user is the e-mail) with ``cents`` on it."""
    visitor = Visitor(portal)
    await visitor.sign_up(email)
    await portal.gw.ledger.topup(email, parse_cents(cents), reference=f"test:{email}")
    return Person(portal, visitor, email, **options)


def client_metadata(redirect_uri: str = REDIRECT_URI, **extra: Any) -> OAuthClientMetadata:
    return OAuthClientMetadata.model_validate(
        {
            "client_name": "SDK test client",
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
            **extra,
        }
    )


def provider(
    person: Person, url: str, storage: MemoryStorage, *, metadata_url: str | None = None, **extra: Any
) -> OAuthClientProvider:
    return OAuthClientProvider(
        server_url=url,
        client_metadata=client_metadata(**extra),
        storage=storage,
        redirect_handler=person.redirect_handler,
        callback_handler=person.callback_handler,
        client_metadata_url=metadata_url,
    )


@asynccontextmanager
async def oauth_client(auth: OAuthClientProvider, url: str, **http_options: Any) -> AsyncIterator[Client]:
    http = httpx2.AsyncClient(auth=auth, timeout=httpx2.Timeout(30.0), **http_options)
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


@dataclass
class RawClient:
    """A client driving the endpoints by hand (for the refusals): registration, PKCE, code, tokens."""

    portal: Portal
    client_id: str
    redirect_uri: str
    verifier: str = field(default_factory=lambda: secrets.token_urlsafe(48))

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode()).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def authorize_url(self, resource: str, **extra: str) -> str:
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "state": "st-" + secrets.token_hex(4),
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "resource": resource,
            "scope": "mcp",
            **extra,
        }
        return self.portal.url("/oauth/authorize?" + urlencode(params))

    async def code(self, person: Person, resource: str) -> str:
        location = await person.answer(self.authorize_url(resource))
        return parse_qs(urlsplit(location).query)["code"][0]

    async def token(self, **form: str) -> tuple[int, dict[str, Any]]:
        data = {"client_id": self.client_id, **form}
        async with aiohttp.ClientSession() as http, http.post(self.portal.url("/oauth/token"), data=data) as resp:
            return resp.status, await resp.json()

    async def redeem(self, code: str, resource: str, **extra: str) -> tuple[int, dict[str, Any]]:
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "code_verifier": self.verifier,
            "resource": resource,
            **extra,
        }
        return await self.token(**form)


async def register(portal: Portal, redirect_uri: str = REDIRECT_URI, **extra: Any) -> RawClient:
    doc = {"client_name": "raw client", "redirect_uris": [redirect_uri], "token_endpoint_auth_method": "none", **extra}
    async with aiohttp.ClientSession() as http, http.post(portal.url("/oauth/register"), json=doc) as resp:
        assert resp.status == 201, await resp.text()
        body = await resp.json()
    return RawClient(portal, body["client_id"], redirect_uri)


async def call(url: str, token: str | None, tool: str = "get_forecast") -> tuple[int, dict[str, str], Any]:
    """One raw initialize + nothing else: (status, headers, body) of a POST to an MCP endpoint."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {"city": "Oslo"}}}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        text = await resp.text()
        return resp.status, dict(resp.headers), text
