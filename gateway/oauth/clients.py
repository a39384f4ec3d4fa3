"""Clients: RFC 7591 registration metadata, and Client ID Metadata Documents fetched safely.

A CIMD ``client_id`` is an https URL chosen by a stranger, and fetching it is an outbound request
from inside the operator's network. ``MetadataFetcher`` therefore: takes https only (``http`` only for
hosts in ``client_metadata_hosts_allowed``), resolves the host itself and refuses private, loopback,
link-local and other non-global addresses unless the host is allowed (and connects to the addresses it
checked, so a second DNS answer cannot swap them), follows no redirect, reads at most
``MAX_DOCUMENT_BYTES`` within ``FETCH_TIMEOUT_S``, and caches documents (``Cache-Control: max-age``
within bounds).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, cast

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from gateway.oauth.models import AUTH_METHODS, AuthMethod, Client
from gateway.oauth.redirects import redirect_problem

MAX_DOCUMENT_BYTES = 5 * 1024
FETCH_TIMEOUT_S = 5.0
MIN_CACHE_S, DEFAULT_CACHE_S, MAX_CACHE_S = 60.0, 300.0, 86400.0
MAX_CACHED = 1000
MAX_REDIRECT_URIS = 20
_MAX_AGE = re.compile(r"max-age\s*=\s*([0-9]+)", re.IGNORECASE)


async def read_limited(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, or None as soon as it is longer than ``limit`` bytes."""
    body = bytearray()
    async for chunk in stream.iter_chunked(4096):
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


class ClientRejected(ValueError):
    """Client metadata that cannot be accepted; the message says why (sent back as the error text)."""


def _text(doc: Mapping[str, Any], name: str, limit: int = 200) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise ClientRejected(f"{name} must be a line of at most {limit} printable characters")
    return value.strip() or None


def _redirect_uris(doc: Mapping[str, Any]) -> tuple[str, ...]:
    uris = doc.get("redirect_uris")
    if not isinstance(uris, list) or not uris or len(uris) > MAX_REDIRECT_URIS:
        raise ClientRejected(f"redirect_uris must be a list of 1 to {MAX_REDIRECT_URIS} URIs")
    for uri in uris:
        problem = redirect_problem(uri)
        if problem is not None:
            raise ClientRejected(problem)
    return tuple(uris)


def _check_grant_types(doc: Mapping[str, Any]) -> None:
    grant_types = doc.get("grant_types", ["authorization_code"])
    if not isinstance(grant_types, list) or not set(grant_types) <= {"authorization_code", "refresh_token"}:
        raise ClientRejected("grant_types may only list authorization_code and refresh_token")
    response_types = doc.get("response_types", ["code"])
    if response_types != ["code"]:
        raise ClientRejected('response_types must be ["code"]')


def registration(doc: object, *, client_id: str, secret_hash: str | None, now: float) -> Client:
    """A dynamically registered client from its RFC 7591 metadata. The auth method defaults to
    ``client_secret_basic`` (RFC 7591 §2); ``secret_hash`` must be given unless it is ``none``."""
    if not isinstance(doc, dict):
        raise ClientRejected("the registration request must be a JSON object")
    method = doc.get("token_endpoint_auth_method", "client_secret_basic")
    if method not in AUTH_METHODS:
        raise ClientRejected(f"token_endpoint_auth_method must be one of {', '.join(AUTH_METHODS)}")
    _check_grant_types(doc)
    return Client(
        client_id=client_id,
        client_name=_text(doc, "client_name"),
        redirect_uris=_redirect_uris(doc),
        auth_method=cast(AuthMethod, method),
        kind="dcr",
        created_at=now,
        client_uri=_text(doc, "client_uri", 2000),
        secret_hash=None if method == "none" else secret_hash,
    )


def wants_secret(doc: object) -> bool:
    return isinstance(doc, dict) and doc.get("token_endpoint_auth_method", "client_secret_basic") != "none"


def metadata_document(url: str, doc: object, *, now: float) -> Client:
    """A client from its metadata document: ``client_id`` must be the document's own URL."""
    if not isinstance(doc, dict):
        raise ClientRejected("the client metadata document must be a JSON object")
    if doc.get("client_id") != url:
        raise ClientRejected("the document's client_id is not the URL it was fetched from")
    method = doc.get("token_endpoint_auth_method", "none")
    if method != "none":
        raise ClientRejected("clients identified by a metadata document must use token_endpoint_auth_method none")
    _check_grant_types(doc)
    return Client(
        client_id=url,
        client_name=_text(doc, "client_name"),
        redirect_uris=_redirect_uris(doc),
        auth_method="none",
        kind="cimd",
        created_at=now,
        client_uri=_text(doc, "client_uri", 2000),
    )


def is_metadata_url(client_id: str) -> bool:
    """Whether a client_id names a metadata document (an https URL with a path) rather than a registration."""
    return client_id.startswith("https://")


def _url_problem(url: str, allowed_hosts: frozenset[str]) -> str | None:
    if len(url) > 2000 or any(c.isspace() for c in url):
        return "the client_id URL is too long or contains whitespace"
    try:
        parts = URL(url)
    except ValueError:
        return "the client_id is not a valid URL"
    host = (parts.host or "").lower().strip("[]")
    if parts.scheme != "https" and not (parts.scheme == "http" and host in allowed_hosts):
        return "a client_id URL must use https"
    if not host or parts.user is not None or parts.password is not None or parts.fragment:
        return "a client_id URL must have a host and no user information or fragment"
    if host not in allowed_hosts and _is_ip(host) and not _global(host):  # no DNS for an IP: check it here
        return f"the client_id host {host} is a private or local address"
    if parts.raw_path in ("", "/") or "/./" in parts.raw_path + "/" or "/../" in parts.raw_path + "/":
        return "a client_id URL must have a path without dot segments"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64 RFC 6052 and RFC 8215, SIIT,
# IPv4-compatible): a translator on the path would connect to that IPv4 address, so it is the one checked.
_IPV4_IN_LOW_BITS = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::ffff:0:0:0/96", "::/96")
)
_SITE_LOCAL = ipaddress.IPv6Network("fec0::/10")  # deprecated, but still routed locally by some networks


def _global(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _SITE_LOCAL:
            return False
        embedded = ip.ipv4_mapped or ip.sixtofour  # (Teredo's 2001::/32 is not global at all)
        if embedded is None and any(ip in net for net in _IPV4_IN_LOW_BITS):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return embedded.is_global and not embedded.is_multicast
    return ip.is_global and not ip.is_multicast


class _GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's threaded resolver, then refuses any non-global address of a host that
    is not allowed. aiohttp connects to exactly the addresses returned here."""

    def __init__(self, allowed_hosts: frozenset[str]) -> None:
        self._inner = ThreadedResolver()
        self._allowed = allowed_hosts

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower().strip("[]") not in self._allowed:
            for result in results:
                if not _global(result["host"]):
                    raise ClientRejected(f"the client_id host resolves to {result['host']}, a private or local address")
        return results

    async def close(self) -> None:
        await self._inner.close()


class MetadataFetcher:
    """Fetches and caches Client ID Metadata Documents (see the module's docstring)."""

    def __init__(self, *, allowed_hosts: tuple[str, ...] = (), clock: Callable[[], float] = time.monotonic) -> None:
        self._allowed = frozenset(h.lower() for h in allowed_hosts)
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Client, float]] = OrderedDict()
        self._session: aiohttp.ClientSession | None = None
        self._locks: dict[str, asyncio.Lock] = {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            # The system's trust store, read when first needed (SSL_CERT_FILE is honoured).
            connector = aiohttp.TCPConnector(
                resolver=_GuardedResolver(self._allowed), ssl=ssl.create_default_context(), limit=20
            )
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S), trust_env=False
            )
        return self._session

    async def client(self, url: str) -> Client:
        """The client a metadata URL describes. Raises ClientRejected saying what is wrong."""
        cached = self._cache.get(url)
        if cached is not None and cached[1] > self._clock():
            return cached[0]
        lock = self._locks.setdefault(url, asyncio.Lock())
        try:
            async with lock:  # one fetch per URL at a time
                cached = self._cache.get(url)
                if cached is not None and cached[1] > self._clock():
                    return cached[0]
                client, max_age = await self._fetch(url)
                self._cache[url] = (client, self._clock() + max_age)
                self._cache.move_to_end(url)
                while len(self._cache) > MAX_CACHED:
                    self._cache.popitem(last=False)
                return client
        finally:
            if not lock.locked():
                self._locks.pop(url, None)

    async def _fetch(self, url: str) -> tuple[Client, float]:
        problem = _url_problem(url, self._allowed)
        if problem is not None:
            raise ClientRejected(problem)
        try:
            async with self._http().get(url, allow_redirects=False, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise ClientRejected(f"fetching the client metadata document answered HTTP {resp.status}")
                body = await read_limited(resp.content, MAX_DOCUMENT_BYTES)
                if body is None:
                    raise ClientRejected(f"the client metadata document is larger than {MAX_DOCUMENT_BYTES} bytes")
                cache_control = resp.headers.get("Cache-Control", "")
        except ClientRejected:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ClientRejected(f"the client metadata document could not be fetched ({type(exc).__name__})") from None
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ClientRejected("the client metadata document is not JSON") from None
        max_age = DEFAULT_CACHE_S
        match = _MAX_AGE.search(cache_control)
        if match is not None:
            max_age = float(match.group(1))
        if "no-store" in cache_control.lower() or "no-cache" in cache_control.lower():
            max_age = MIN_CACHE_S
        return metadata_document(url, doc, now=time.time()), min(max(max_age, MIN_CACHE_S), MAX_CACHE_S)
