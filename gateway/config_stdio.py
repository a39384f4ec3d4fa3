"""The ``command:`` keys of a server the gateway runs itself (a stdio MCP server, issue 20): what to
run, its environment and working directory, how many children and for how long, and their resource
limits. Parsed with the same ``Reader`` as the rest of ``gateway.config`` (every error with its line).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from yaml.nodes import Node, ScalarNode

from gateway.config_yaml import FLOAT_TAG, INT_TAG, Reader, is_null, resolve_path

_T = TypeVar("_T")

STDIO_KEYS = (
    "command", "env", "cwd", "max_processes", "idle_timeout_s", "warm_processes", "stop_grace_s", "rlimits",
)  # fmt: skip
_RLIMIT_KEYS = ("address_space_mb", "cpu_s", "open_files")


@dataclass(frozen=True, slots=True, kw_only=True)
class StdioConfig:
    """How the gateway runs a stdio-only MCP server itself: one child process per MCP session."""

    command: tuple[str, ...]  # argv; the first item is looked up on PATH
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), repr=False)  # may hold secrets
    cwd: Path | None = None
    max_processes: int = 50  # child processes of this server at once (sessions, spares, stateless)
    idle_timeout_s: float = 300.0  # a child idle this long is stopped (its session ends)
    warm_processes: int = 1  # started ahead for new sessions; also the shared children of stateless requests
    stop_grace_s: float = 5.0  # between SIGTERM and SIGKILL when a child is stopped
    rlimit_address_space_mb: int | None = None  # RLIMIT_AS
    rlimit_cpu_s: int | None = None  # RLIMIT_CPU
    rlimit_open_files: int | None = None  # RLIMIT_NOFILE

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(self.command))
        if not isinstance(self.env, MappingProxyType):
            object.__setattr__(self, "env", MappingProxyType(dict(self.env)))


def parse_stdio(
    r: Reader, where: str, entries: Mapping[str, tuple[ScalarNode, Node]], base: Path, *, has_upstream: bool
) -> StdioConfig | None:
    """The keys of a server the gateway runs itself (``command`` instead of ``upstream``)."""
    given = [key for key in STDIO_KEYS if key in entries and not is_null(entries[key][1])]
    if not given:
        return None
    if "command" not in given:
        raise r.error(f"{where}.{given[0]} is only for stdio servers: give {where}.command too", entries[given[0]][1])
    command_node = entries["command"][1]
    if has_upstream:
        raise r.error(
            f"{where} has both upstream and command: give upstream for a server that speaks HTTP, or command "
            "for a stdio server the gateway runs itself, not both",
            command_node,
        )
    command = [text for text, _ in r.string_list(command_node, f"{where}.command")]
    if not command:
        raise r.error(
            f'{where}.command must list the program and its arguments, e.g. ["npx", "-y", "pkg"]', command_node
        )

    def opt(key: str, parse: Callable[[Node, str], _T], default: _T) -> _T:
        if key not in entries or is_null(entries[key][1]):
            return default
        return parse(entries[key][1], f"{where}.{key}")

    env: dict[str, str] = {}
    if "env" in given:
        for name, (name_node, value_node) in r.mapping(entries["env"][1], f"{where}.env").items():
            if not name or "=" in name or "\0" in name:
                raise r.error(f"{where}.env: {name!r} is not an environment variable name", name_node)
            if isinstance(value_node, ScalarNode) and value_node.tag in (INT_TAG, FLOAT_TAG):
                env[name] = str(value_node.value)
            else:
                env[name] = r.env_string(value_node, f"{where}.env.{name}")
    cwd = opt("cwd", lambda n, w: resolve_path(base, r.string(n, w)), None)
    limits: dict[str, int] = {}
    if "rlimits" in given:
        limit_entries = r.mapping(entries["rlimits"][1], f"{where}.rlimits")
        r.check_keys(limit_entries, _RLIMIT_KEYS, f"{where}.rlimits")
        for name, (_, value_node) in limit_entries.items():
            if not is_null(value_node):
                limits[name] = r.integer(value_node, f"{where}.rlimits.{name}", minimum=1)
    return StdioConfig(
        command=tuple(command),
        env=MappingProxyType(env),
        cwd=cwd,
        max_processes=opt("max_processes", lambda n, w: r.integer(n, w, minimum=1), 50),
        idle_timeout_s=opt("idle_timeout_s", lambda n, w: r.number(n, w, positive=True), 300.0),
        warm_processes=opt("warm_processes", lambda n, w: r.integer(n, w, minimum=0), 1),
        stop_grace_s=opt("stop_grace_s", lambda n, w: r.number(n, w, positive=False), 5.0),
        rlimit_address_space_mb=limits.get("address_space_mb"),
        rlimit_cpu_s=limits.get("cpu_s"),
        rlimit_open_files=limits.get("open_files"),
    )
