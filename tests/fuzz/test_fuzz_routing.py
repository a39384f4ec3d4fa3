"""Fuzzing request routing (``gateway.proxy.routing``) and key extraction (``gateway.keys``).

Routing contract: any (Host, raw path) resolves to a *configured* server or raises BadRequest /
UnknownServer; a path with an encoded slash or backslash or a dot-segment is refused outright; and
the chosen server is always the one the request literally names — the first path segment (after an
optional ``/k/<key>``), or the server owning the Host — never one reached through path tricks.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from gateway import keys
from gateway.errors import BadRequest, GatewayError, UnknownServer
from gateway.proxy import routing
from tests.fuzz.common import assert_clear, fuzz, tried

SERVERS = ("weather", "maps", "a-b", "x_1")
HOSTS: Mapping[str, str] = {"weather.example.com": "weather", "maps.example.com": "maps", "[::1]": "x_1"}
KEY = "ap_" + "K" * 43

segments = st.sampled_from(
    [
        *SERVERS, "k", KEY, "mcp", "sse", "messages", "", ".", "..", "%2e", "%2E%2e", ".%2e", "%2f", "%2F",
        "%5c", "%5C", "\\", "%252f", "%2", "weather%2fmaps", "..;", ";", "%00", "?", "#", "mcp?x=1", "WEATHER",
        "weather.", ".weather", "%77eather", "k%2f", "\u00e9", " ",
    ]
) | st.text(max_size=6)  # fmt: skip
paths = st.lists(segments, max_size=7).map(lambda segs: "/" + "/".join(segs)) | st.text(max_size=30)
ODD_HOSTS = [
    "weather.example.com", "WEATHER.example.COM", "weather.example.com:443", "maps.example.com:8080",
    "maps.example.com.", "[::1]", "[::1]:8080", "gw", "gw:80", "", " ", "weather.example.com, maps.example.com",
    "maps.example.com@weather.example.com", "x:y:z", "[", "]", "maps.example.com:", ":80",
]  # fmt: skip
hosts = st.none() | st.sampled_from(ODD_HOSTS) | st.text(max_size=20)


def literal_server(raw_path: str) -> str | None:
    """The server a path names literally: its first segment, after an optional /k/<key>/."""
    parts = raw_path.split("/")[1:]
    if len(parts) >= 2 and parts[0] == "k":
        parts = parts[2:]
    return parts[0] if parts else None


def is_tricky(raw_path: str) -> bool:
    lowered = raw_path.lower()
    segs = raw_path.split("/")
    return (
        "%2f" in lowered
        or "%5c" in lowered
        or "\\" in raw_path
        or any(s in (".", "..") or "%2e" in s.lower() for s in segs)
        or not raw_path.startswith("/")
    )


@fuzz(1500)
@given(host=hosts, path=paths)
def test_resolve_picks_a_configured_server_the_request_names_or_refuses(host: str | None, path: str) -> None:
    tried("routing.resolve")
    try:
        route = routing.resolve(host, path, servers=SERVERS, hosts=HOSTS)
    except (BadRequest, UnknownServer) as exc:
        assert_clear(exc)
        return
    assert route.server in SERVERS
    assert route.endpoint in ("mcp", "sse", "messages")
    assert not is_tricky(path), f"{path!r} has an encoded slash or dot-segment and was routed"
    full = host.strip().lower().rstrip(".") if host else ""
    host_server = HOSTS.get(full) or HOSTS.get(routing.host_name(host) or "")  # a configured host:port first
    if host_server is not None:
        assert route.server == host_server
    else:
        assert route.server == literal_server(path)
    if route.path_key is not None:
        assert path.startswith(f"/k/{route.path_key}/")
        assert route.path_key not in routing.redact_path(path)
    if route.endpoint != "messages":
        assert route.tail == ""


@fuzz(600)
@given(
    host=hosts,
    prefix=st.lists(segments, max_size=3),
    trick=st.sampled_from(["%2f", "%2F", "%5c", "\\", "/../", "/./", "/%2e%2e/", "/%2E/"]),
    rest=st.lists(segments, max_size=3),
)
def test_a_path_with_encoded_slashes_or_dot_segments_is_always_refused(
    host: str | None, prefix: list[str], trick: str, rest: list[str]
) -> None:
    tried("routing.resolve tricks")
    path = "/" + "/".join(prefix) + trick + "/".join(rest)
    with pytest.raises(BadRequest) as refused:
        routing.resolve(host, path, servers=SERVERS, hosts=HOSTS)
    assert_clear(refused.value)


@fuzz(500)
@given(host=hosts)
def test_host_name_is_total(host: str | None) -> None:
    tried("routing.host_name")
    name = routing.host_name(host)
    assert name is None or name == name.lower()


@fuzz(500)
@given(path=paths, key=st.sampled_from([KEY, "ap_short", "apst_" + "t" * 43]))
def test_redact_path_removes_the_key_of_every_routable_path(path: str, key: str) -> None:
    tried("routing.redact_path")
    for candidate in (path, f"/k/{key}{path}", f"/k/{key}/weather/mcp"):
        try:
            route = routing.resolve("gw", candidate, servers=SERVERS, hosts=HOSTS)
        except GatewayError:
            continue
        if route.path_key:
            assert route.path_key not in routing.redact_path(candidate)


# --- key extraction ----------------------------------------------------------------------------
header_names = st.sampled_from(
    [
        "Authorization", "authorization", "AUTHORIZATION", "X-API-Key", "x-api-key", "X-Api-Key",
        "Proxy-Authorization", "Cookie", "X-Auth", "Api-Key", "Mcp-Session-Id",
    ]
)  # fmt: skip
header_values = st.text(max_size=30) | st.builds(
    lambda scheme, sep, token: f"{scheme}{sep}{token}",
    st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "Token", " Bearer", "Bearer:"]),
    st.sampled_from([" ", "  ", "\t", ""]),
    st.sampled_from([KEY, "", " ", f" {KEY} ", "ap_x y"]) | st.text(max_size=10),
)


@fuzz(1000)
@given(pairs=st.lists(st.tuples(header_names, header_values), max_size=5))
def test_key_from_headers_takes_only_a_bearer_token_or_x_api_key(pairs: list[tuple[str, str]]) -> None:
    tried("keys.key_from_headers")
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    key = keys.key_from_headers(headers)
    auth = headers.get("Authorization")
    api_key = headers.get("X-API-Key")
    if key is None:
        if auth:
            scheme, _, value = auth.strip().partition(" ")
            assert scheme.lower() != "bearer" or not value.strip()
        assert not (api_key and api_key.strip())
        return
    assert key and key == key.strip()
    from_bearer = auth is not None and auth.strip().lower().startswith("bearer ") and key == auth.strip()[7:].strip()
    assert from_bearer or key == (api_key or "").strip(), "the key came from a header that does not carry keys"
    assert keys.display_prefix(key) != key or len(key) <= 11


@fuzz(500)
@given(secret=st.text(max_size=64))
def test_hashing_and_prefixes_are_total_on_text(secret: str) -> None:
    tried("keys.hash_secret/display_prefix")
    digest = keys.hash_secret(secret)
    assert len(digest) == 64 and digest == keys.hash_secret(secret)
    shown = keys.display_prefix(secret)
    assert len(shown) <= 16
    assert keys.constant_time_equals(secret, secret)


# --- regressions found by fuzzing --------------------------------------------------------------
@pytest.mark.parametrize("configured", ["api.example.com:8443", "[::1]:8080"])
def test_a_configured_host_with_a_port_routes_to_its_server(configured: str) -> None:
    route = routing.resolve(configured, "/mcp", servers=SERVERS, hosts={configured: "weather"})
    assert route.server == "weather"


@pytest.mark.parametrize("path", [f"//k/{KEY}/weather/mcp", f"/k//{KEY}/weather/mcp", f"/{KEY}/mcp"])
def test_a_key_anywhere_in_a_path_is_redacted(path: str) -> None:
    assert KEY not in routing.redact_path(path)


MIXED_KEY = "ap_" + "Ab9_-" * 8 + "xyz"  # every character class a key has
KEY_PLACES = [
    "/{key}/mcp", "/{key}", "/x-{key}/mcp", "/k/x/{key}/mcp", "//k/{key}/weather/mcp", "/k//{key}/weather/mcp",
    "/k/{key}/weather/mcp", "/k/{key}/nowhere/mcp", "/weather/{key}", "/weather/mcp/{key}",
]  # fmt: skip


def fully_decoded(text: str) -> str:
    for _ in range(4):
        text = unquote(text)
    return text


@fuzz(800)
@given(
    place=st.sampled_from(KEY_PLACES),
    encoded=st.lists(st.booleans(), min_size=len(MIXED_KEY), max_size=len(MIXED_KEY)),
    twice=st.booleans(),
    upper=st.booleans(),
)
def test_a_percent_encoded_key_anywhere_in_a_path_is_redacted_and_never_named_in_a_404(
    place: str, encoded: list[bool], twice: bool, upper: bool
) -> None:
    tried("routing.redact_path percent-encoded")
    escape = "%25" if twice else "%"
    hex_digits = "{:02X}" if upper else "{:02x}"
    key = "".join(escape + hex_digits.format(ord(c)) if e else c for c, e in zip(MIXED_KEY, encoded, strict=True))
    path = place.format(key=key)
    assert MIXED_KEY not in fully_decoded(routing.redact_path(path))
    try:
        routing.resolve("gw", path, servers=SERVERS, hosts={})
    except UnknownServer as exc:
        assert MIXED_KEY not in fully_decoded(exc.text())
    except BadRequest:
        pass


@pytest.mark.parametrize("path", ["/ap%5F{rest}/mcp", "/k/ap%5F{rest}/x/mcp", "/%61p_{rest}/mcp", "/ap%255F{rest}/mcp"])
def test_a_key_with_a_percent_encoded_character_is_redacted(path: str) -> None:
    path = path.format(rest=KEY[3:])
    assert KEY[3:] not in routing.redact_path(path)


def test_a_key_with_undecodable_bytes_hashes_without_error() -> None:
    secret = b"ap_\xff\xfe".decode("utf-8", "surrogateescape")
    keys.hash_secret(secret)
    keys.constant_time_equals(secret, "ap_x")
