"""Ready-to-paste client set-up for one server and one key: what the portal shows once under a new
key and what ``agentpay demo`` prints. Pure: strings in, strings out."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientSetup:
    client: str  # "Claude Code", ...
    where: str  # where it goes (a command line, a file)
    text: str  # what to paste


def server_url(base: str, server: str) -> str:
    """The server's MCP endpoint on the gateway (``base``: scheme://host[:port], no trailing slash)."""
    return f"{base.rstrip('/')}/{server}/mcp"


def connector_url(base: str, server: str, key: str) -> str:
    """The endpoint with the key in the path, for clients that take only a URL (remote connectors)."""
    return f"{base.rstrip('/')}/k/{key}/{server}/mcp"


def client_setups(base: str, server: str, key: str) -> list[ClientSetup]:
    url = server_url(base, server)
    cursor = {"mcpServers": {server: {"url": url, "headers": {"Authorization": f"Bearer {key}"}}}}
    desktop = {
        "mcpServers": {
            server: {
                "command": "npx",
                "args": ["mcp-remote", url, "--header", "Authorization:${AUTH_HEADER}"],
                "env": {"AUTH_HEADER": f"Bearer {key}"},
            }
        }
    }
    return [
        ClientSetup(
            "Claude Code",
            "a command line",
            f'claude mcp add --transport http {server} {url} --header "Authorization: Bearer {key}"',
        ),
        ClientSetup("Cursor", "~/.cursor/mcp.json", json.dumps(cursor, indent=2)),
        ClientSetup("Claude Desktop (via mcp-remote)", "claude_desktop_config.json", json.dumps(desktop, indent=2)),
        ClientSetup(
            "Connector URL", "a client that takes only a URL (the key is in the path)", connector_url(base, server, key)
        ),
    ]


def client_configs(base: str, server: str, key: str) -> str:
    """The text form (``agentpay demo`` prints it): every set-up, JSON on one line."""
    lines: list[str] = []
    for setup in client_setups(base, server, key):
        text = json.dumps(json.loads(setup.text)) if setup.text.startswith("{") else setup.text
        lines += [f"{setup.client} ({setup.where}):", f"  {text}"]
    return "\n".join(lines)
