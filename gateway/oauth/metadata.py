"""The discovery documents (RFC 8414 authorization-server metadata, RFC 9728 protected-resource
metadata), the resource URL a request was made to, and the 401 challenge pointing at its metadata."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway.addresses import trusted
from gateway.config import GatewayConfig
from gateway.oauth.models import AUTH_METHODS, DEFAULT_SCOPE, SUPPORTED_SCOPES
from gateway.proxy.routing import Route, host_name

PRM_PATH = "/.well-known/oauth-protected-resource"
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"
REGISTER_PATH = "/oauth/register"
REVOKE_PATH = "/oauth/revoke"


def authorization_server(issuer: str) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "authorization_endpoint": issuer + AUTHORIZE_PATH,
        "token_endpoint": issuer + TOKEN_PATH,
        "registration_endpoint": issuer + REGISTER_PATH,
        "revocation_endpoint": issuer + REVOKE_PATH,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "revocation_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "scopes_supported": list(SUPPORTED_SCOPES),
        "client_id_metadata_document_supported": True,
        "authorization_response_iss_parameter_supported": True,
    }


def protected_resource(resource: str, issuer: str, server: str) -> dict[str, Any]:
    return {
        "resource": resource,
        "authorization_servers": [issuer],
        "scopes_supported": list(SUPPORTED_SCOPES),
        "bearer_methods_supported": ["header"],
        "resource_name": server,
    }


def public_origin(request: web.Request, config: GatewayConfig) -> str:
    """The origin the client used: its Host (or X-Forwarded-Host/-Proto from a trusted proxy) and the
    scheme the gateway serves (https when it terminates TLS)."""
    trusted_peer = trusted(request.remote, config.trusted_proxies)
    proto = (request.headers.get("X-Forwarded-Proto") if trusted_peer else None) or (
        "https" if config.tls_cert is not None else request.scheme
    )
    host = (request.headers.get("X-Forwarded-Host") if trusted_peer else None) or request.headers.get("Host") or ""
    host = host.split(",")[0].strip().lower()
    if proto not in ("http", "https") or host_name(host) is None or any(c in host for c in "/?#@ \\"):
        host = config.listen
    return f"{proto}://{host}"


def resource_path(route: Route, raw_path: str, host_routed: bool) -> str:
    """The path of the resource a request named: as sent for ``/<server>/mcp`` (or ``/sse``), the
    canonical endpoint otherwise (a key in the path, the SSE messages endpoint)."""
    if route.path_key is None and route.endpoint in ("mcp", "sse"):
        return raw_path
    return "/mcp" if host_routed else f"/{route.server}/mcp"


def challenge(metadata_url: str, *, error: str | None) -> str:
    """The ``WWW-Authenticate`` value of a 401 on a protected resource (RFC 6750 §3, RFC 9728 §5.1)."""
    value = f'Bearer resource_metadata="{metadata_url}", scope="{DEFAULT_SCOPE}"'
    if error is not None:
        value += f', error="{error}"'
    return value
