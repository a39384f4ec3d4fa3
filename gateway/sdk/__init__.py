"""The AgentPay SDK for MCP developers who integrate in code instead of behind the proxy. It imports
nothing of the gateway (only aiohttp and the standard library): ``client`` talks to the service API,
``tools`` reads the user's key from a request and makes a tool paid (``paid_tool``)."""

from gateway.sdk.client import (
    AgentPay,
    AgentPayError,
    ChargeReceipt,
    HoldReceipt,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidKey,
    InvalidServiceToken,
    KeyInfo,
    NotFound,
    RefundReceipt,
    cents_text,
)
from gateway.sdk.tools import key_from_asgi, key_from_headers, key_from_mcp_context, key_from_request, paid_tool

__all__ = [
    "AgentPay",
    "AgentPayError",
    "ChargeReceipt",
    "HoldReceipt",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InvalidKey",
    "InvalidServiceToken",
    "KeyInfo",
    "NotFound",
    "RefundReceipt",
    "cents_text",
    "key_from_asgi",
    "key_from_headers",
    "key_from_mcp_context",
    "key_from_request",
    "paid_tool",
]
