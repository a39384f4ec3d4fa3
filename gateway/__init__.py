"""AgentPay: the payments gateway for MCP servers."""

__version__ = "0.1.0"
