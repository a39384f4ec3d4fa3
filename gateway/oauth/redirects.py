"""Redirect URIs: which may be registered, and when a requested one matches a registered one.

Matching is exact (string equality), except for loopback redirects (``http://127.0.0.1``,
``http://[::1]``, ``http://localhost``), which match on any port (RFC 8252 §7.3): native clients
listen on whatever port is free. Custom schemes (``cursor://…``) are allowed; plain ``http`` is
allowed on loopback only; schemes a browser would run or read locally are refused.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
_REFUSED_SCHEMES = frozenset({"javascript", "data", "file", "vbscript", "about", "blob", "filesystem", "ws", "wss"})
MAX_URI_CHARS = 2000


def redirect_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be a redirect URI, or None when it can."""
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI_CHARS:
        return "a redirect URI must be a non-empty string of at most 2000 characters"
    if any(c.isspace() or ord(c) < 0x21 or ord(c) == 0x7F for c in uri):
        return f"redirect URI {uri!r} contains whitespace or control characters"
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return f"redirect URI {uri!r} is not a valid URI"
    scheme = parts.scheme.lower()
    if not scheme:
        return f"redirect URI {uri!r} is not absolute"
    if parts.fragment or "#" in uri:
        return f"redirect URI {uri!r} must not contain a fragment"
    if scheme in _REFUSED_SCHEMES:
        return f"redirect URI scheme {scheme!r} is not allowed"
    if scheme in ("http", "https"):
        if not parts.hostname:
            return f"redirect URI {uri!r} has no host"
        if parts.username is not None or parts.password is not None:
            return f"redirect URI {uri!r} must not contain user information"
        if scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
            return f"redirect URI {uri!r} uses http on a host that is not loopback; use https"
    return None


def is_loopback(uri: str) -> bool:
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS


def redirect_matches(requested: str, registered: str) -> bool:
    """Whether ``requested`` is ``registered``: equal, or loopback with only the port differing."""
    if requested == registered:
        return True
    if not (is_loopback(requested) and is_loopback(registered)):
        return False
    try:
        a, b = urlsplit(requested), urlsplit(registered)
        a.port, b.port  # noqa: B018 - validate both ports
    except ValueError:
        return False
    return (a.hostname, a.path or "/", a.query) == (b.hostname, b.path or "/", b.query) and a.username is None


def find_redirect(requested: str | None, registered: tuple[str, ...]) -> str | None:
    """The redirect URI to use: ``requested`` when it matches one registered, or the only registered one
    when none was requested (RFC 6749 §3.1.2.3). None: no acceptable redirect URI."""
    if requested is None:
        return registered[0] if len(registered) == 1 else None
    if redirect_problem(requested) is not None:
        return None
    return requested if any(redirect_matches(requested, uri) for uri in registered) else None


_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*$")
_HOST = re.compile(r"^(?:[a-z0-9.-]+|\[[0-9a-f:.]+\])$")


def csp_source(uri: str) -> str:
    """A CSP source expression that allows navigating to ``uri`` (the consent form's POST is answered
    by a redirect there, and ``form-action`` applies to redirects): its origin, or its scheme for a
    custom scheme. Nothing of the URI that could end the directive is ever copied."""
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return "'none'"
    scheme, host = parts.scheme.lower(), parts.hostname or ""
    if not _SCHEME.match(scheme):
        return "'none'"
    if scheme not in ("http", "https"):
        return f"{scheme}:"
    if ":" in host:
        host = f"[{host}]"
    if not _HOST.match(host):
        return f"{scheme}:"
    return f"{scheme}://{host}" + (f":{port}" if port else "")
