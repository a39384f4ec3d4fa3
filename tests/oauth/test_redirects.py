"""Redirect URI rules: what may be registered, what matches, and the consent page's form-action source."""

from __future__ import annotations

import pytest

from gateway.oauth.redirects import csp_source, find_redirect, redirect_matches, redirect_problem


@pytest.mark.parametrize(
    "uri",
    [
        "https://claude.ai/api/mcp/auth_callback",
        "https://chatgpt.com/connector_platform_oauth_redirect",
        "http://localhost:3334/oauth/callback",
        "http://127.0.0.1/callback",
        "http://[::1]:6276/oauth/callback",
        "cursor://anysphere.cursor-mcp/oauth/callback",
    ],
)
def test_the_redirect_uris_real_clients_use_can_be_registered(uri: str) -> None:
    assert redirect_problem(uri) is None


@pytest.mark.parametrize(
    "uri",
    [
        "http://evil.example/callback",  # http off loopback
        "javascript:alert(1)",
        "data:text/html,hi",
        "file:///etc/passwd",
        "https://app.example/cb#fragment",
        "https://user:pw@app.example/cb",
        "/relative/callback",
        "https://app.example/cb with space",
        "",
    ],
)
def test_unsafe_redirect_uris_cannot_be_registered(uri: str) -> None:
    assert redirect_problem(uri) is not None


def test_loopback_redirects_match_on_any_port_and_nothing_else_does() -> None:
    assert redirect_matches("http://127.0.0.1:51234/callback", "http://127.0.0.1/callback")
    assert redirect_matches("http://localhost:4000/cb", "http://localhost:3000/cb")
    assert not redirect_matches("http://localhost:4000/other", "http://localhost:3000/cb")
    assert not redirect_matches("http://127.0.0.1:4000/cb", "http://localhost:4000/cb")  # another host
    assert not redirect_matches(
        "https://claude.ai:444/api/mcp/auth_callback", "https://claude.ai/api/mcp/auth_callback"
    )
    assert not redirect_matches("https://claude.ai/api/mcp/auth_callback/", "https://claude.ai/api/mcp/auth_callback")
    assert find_redirect(None, ("https://a.example/cb",)) == "https://a.example/cb"
    assert find_redirect(None, ("https://a.example/cb", "https://b.example/cb")) is None


def test_the_form_action_source_is_the_redirect_origin_and_never_more() -> None:
    assert csp_source("http://localhost:3334/oauth/callback") == "http://localhost:3334"
    assert csp_source("cursor://anysphere.cursor-mcp/oauth/callback") == "cursor:"
    assert csp_source("http://[::1]:5/cb") == "http://[::1]:5"
    assert ";" not in csp_source("https://a;script-src/x") and " " not in csp_source("https://a;script-src/x")
