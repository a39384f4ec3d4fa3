"""The MCP protocol core: JSON-RPC messages, SSE events, per-session state and the ids the gateway
sends upstream. Pure: no I/O, no ledger, no HTTP framework.
"""
