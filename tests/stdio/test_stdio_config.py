"""The configuration of stdio servers: ``command`` instead of ``upstream``, and its options."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config, parse_config
from gateway.errors import ConfigError
from gateway.ops.serve import check
from tests.harness import prepare_ledger
from tests.stdio.conftest import FASTMCP, stdio_config

HEAD = 'database: "sqlite:///ledger.db"\nprices: "prices.yaml"\nservers:\n  files:\n    owner: acme\n'


def parse(servers_tail: str, env: dict[str, str] | None = None) -> object:
    return parse_config(HEAD + servers_tail, path=Path("/etc/agentpay/gateway.yaml"), env=env or {})


def test_a_stdio_server_is_configured_with_its_command_env_and_limits() -> None:
    config = parse(
        '    command: ["npx", "-y", "@modelcontextprotocol/server-everything"]\n'
        '    env: {API_TOKEN: "${FILES_API_TOKEN}", LEVEL: 3}\n'
        "    cwd: work\n"
        "    max_processes: 7\n"
        "    idle_timeout_s: 60\n"
        "    rlimits: {address_space_mb: 512, cpu_s: 30, open_files: 64}\n",
        env={"FILES_API_TOKEN": "s3cret"},
    )
    server = config.servers["files"]  # type: ignore[attr-defined]
    assert server.upstream is None and server.stdio is not None
    stdio = server.stdio
    assert stdio.command == ("npx", "-y", "@modelcontextprotocol/server-everything")
    assert dict(stdio.env) == {"API_TOKEN": "s3cret", "LEVEL": "3"}
    assert stdio.cwd == Path("/etc/agentpay/work")
    assert (stdio.max_processes, stdio.idle_timeout_s, stdio.warm_processes, stdio.stop_grace_s) == (7, 60.0, 1, 5.0)
    assert (stdio.rlimit_address_space_mb, stdio.rlimit_cpu_s, stdio.rlimit_open_files) == (512, 30, 64)
    assert "s3cret" not in repr(server)


def test_the_defaults_are_fifty_processes_and_five_minutes_idle() -> None:
    stdio = parse('    command: ["python", "server.py"]\n').servers["files"].stdio  # type: ignore[attr-defined]
    assert (stdio.max_processes, stdio.idle_timeout_s, stdio.cwd) == (50, 300.0, None)


def test_check_config_refuses_a_server_with_both_upstream_and_command() -> None:
    with pytest.raises(ConfigError, match="both upstream and command"):
        parse('    upstream: "http://127.0.0.1:9000/mcp"\n    command: ["python", "server.py"]\n')


def test_a_server_with_neither_upstream_nor_command_stays_sdk_only() -> None:
    server = parse("").servers["files"]  # type: ignore[attr-defined]
    assert server.upstream is None and server.stdio is None


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("    command: []\n", "must list the program"),
        ('    command: "npx server"\n', "must be a list of strings"),
        ("    max_processes: 3\n", "give servers.files.command too"),
        ('    command: ["x"]\n    rlimits: {memory: 5}\n', "unknown key 'memory'"),
        ('    command: ["x"]\n    max_processes: 0\n', "at least 1"),
        ('    command: ["x"]\n    env: {TOKEN: "${MISSING}"}\n', "MISSING is not set"),
    ],
)
def test_invalid_stdio_settings_are_refused_with_their_line(tail: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(tail)


async def test_check_config_refuses_a_command_that_cannot_start_and_shows_the_command_of_one_that_can(
    tmp_path: Path,
) -> None:
    good = stdio_config(tmp_path, command=FASTMCP)
    await prepare_ledger(good)
    report = await check(load_config(good))
    assert report["servers"]["weather"]["command"] == FASTMCP and report["servers"]["weather"]["upstream"] is None
    bad = stdio_config(tmp_path, command=["no-such-mcp-server-anywhere", "--stdio"])
    with pytest.raises(
        ConfigError, match=r"servers\.weather\.command cannot start: 'no-such-mcp-server-anywhere' is not found"
    ):
        await check(load_config(bad))
