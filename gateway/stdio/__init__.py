"""Stdio-only MCP servers run by the gateway itself, one child process per MCP session, and served
to clients over Streamable HTTP through the same proxy pipeline (keys, prices, billing) as HTTP
upstreams. ``StdioUpstream`` is the server's upstream: the proxy's relay talks to it as it talks to
an HTTP upstream client.
"""

from gateway.stdio.pool import StdioUpstream

__all__ = ["StdioUpstream"]
