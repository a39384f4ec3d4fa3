"""Helpers for MCP servers that charge through the SDK: reading the user's key from a request, and
``paid_tool``, which holds before a tool runs and captures when it returns."""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import typing
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from gateway.sdk.client import AgentPay, AgentPayError, InvalidKey, cents_text

P = ParamSpec("P")
R = TypeVar("R")


def key_from_headers(headers: Mapping[str, str] | None) -> str | None:
    """The key from ``Authorization: Bearer`` or ``X-API-Key`` in any header mapping (case-insensitive)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    auth = lowered.get("authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = lowered.get("x-api-key", "").strip()
    return api_key or None


def key_from_request(request: Any) -> str | None:
    """From an aiohttp ``web.Request`` (or any request object with a ``headers`` mapping)."""
    headers = getattr(request, "headers", None)
    return key_from_headers(dict(headers.items())) if headers is not None else None


def key_from_asgi(scope_or_request: Any) -> str | None:
    """From an ASGI scope dict or a Starlette request (anything with ``.headers`` or ``.scope``)."""
    headers = getattr(scope_or_request, "headers", None)
    if headers is not None and not isinstance(scope_or_request, dict):
        return key_from_headers(dict(headers.items()))
    scope = scope_or_request if isinstance(scope_or_request, dict) else getattr(scope_or_request, "scope", {})
    raw = scope.get("headers") or []
    return key_from_headers({k.decode("latin-1"): v.decode("latin-1") for k, v in raw})


def key_from_mcp_context(ctx: Any) -> str | None:
    """From the ``Context`` of an ``mcp`` SDK / FastMCP tool served over HTTP."""
    headers = getattr(ctx, "headers", None)
    if headers is None:
        request = getattr(getattr(ctx, "request_context", None), "request", None)
        headers = getattr(request, "headers", None)
    return key_from_headers(dict(headers.items())) if headers is not None else None


def _tool_error(exc: AgentPayError) -> Exception:
    """An error the MCP framework shows to the client (its own ToolError when it is installed), so the
    agent learns the price and balance instead of a generic failure."""
    text = f"{exc.code}: {exc.message}"
    for module_name in ("mcp.server.mcpserver.exceptions", "fastmcp.exceptions"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        tool_error = getattr(module, "ToolError", None)
        if isinstance(tool_error, type) and issubclass(tool_error, Exception):
            return tool_error(text)
    return exc


def paid_tool(
    pay: AgentPay | Callable[[], AgentPay], amount_cents: int | Decimal | str, *, feature: str | None = None
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Make an async MCP tool paid: hold before it runs (refusing at once when the user cannot afford
    it), capture when it returns, release when it raises. The tool must take a ``ctx`` parameter
    (the SDK's ``Context``) so the user's key can be read from the HTTP request::

        @server.tool()
        @paid_tool(pay, "2.5")
        async def search(query: str, ctx: Context) -> str: ...
    """
    amount = cents_text(amount_cents)

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        name = feature or fn.__name__
        sig = inspect.signature(fn)
        if "ctx" not in sig.parameters:
            raise TypeError(f"paid tool {fn.__name__!r} must take a `ctx` parameter (the request Context)")

        try:  # resolve annotations in the tool's own module, so frameworks still find `ctx: Context`
            hints = typing.get_type_hints(fn)
        except (NameError, TypeError):
            hints = dict(getattr(fn, "__annotations__", {}))

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            client = pay() if callable(pay) and not isinstance(pay, AgentPay) else pay
            ctx = sig.bind_partial(*args, **kwargs).arguments.get("ctx")
            key = key_from_mcp_context(ctx)
            if key is None:
                raise InvalidKey("missing_key", "No AgentPay API key was sent with this request", 401)
            try:
                held = await client.hold(key, amount, name)
            except AgentPayError as exc:
                raise _tool_error(exc) from exc
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                await asyncio.shield(client.release(held.id))
                raise
            await asyncio.shield(client.capture(held.id))
            return result

        wrapper.__annotations__ = hints
        return wrapper

    return decorate
