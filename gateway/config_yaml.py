"""Reading the YAML of the config file node by node, so that every value keeps its line: typed
scalars (no coercion: a value of the wrong type is an error), mappings whose unknown keys are refused
(with a "did you mean"), ``${VAR}`` expansion from the environment, and one ``ConfigError`` naming the
file and line for every problem. Used by ``gateway.config``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.errors import ConfigError

_ENV_REF_RE = re.compile(r"\$\{([^}]*)\}")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
INT_TAG = "tag:yaml.org,2002:int"
FLOAT_TAG = "tag:yaml.org,2002:float"
STR_TAG = "tag:yaml.org,2002:str"
BOOL_TAG = "tag:yaml.org,2002:bool"
NULL_TAG = "tag:yaml.org,2002:null"


def expand_env(text: str, env: Mapping[str, str] | None = None) -> str:
    """Replace ``${NAME}`` references with environment variables; KeyError/ValueError otherwise."""
    environ: Mapping[str, str] = os.environ if env is None else env

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"${{{name}}} is not a valid environment variable reference")
        if name not in environ:
            raise KeyError(name)
        return environ[name]

    expanded = _ENV_REF_RE.sub(substitute, text)
    # "${" without a closing brace is a typo, not a value.
    if "${" in _ENV_REF_RE.sub("", text):
        raise ValueError("unterminated ${...} reference")
    return expanded


# --------------------------------------------------------------------------------------------
# Node walking
# --------------------------------------------------------------------------------------------
def line_of(node: Node) -> int:
    """1-based line of a node."""
    return int(node.start_mark.line) + 1


class Reader:
    """Validation helpers that all know the file name, so every error has file and line."""

    def __init__(self, file: str, env: Mapping[str, str]):
        self.file = file
        self.env = env
        self._constructor = SafeConstructor()

    def error(self, message: str, node: Node | int | None) -> ConfigError:
        line = node if isinstance(node, int) or node is None else line_of(node)
        return ConfigError(message, file=self.file, line=line)

    def mapping(self, node: Node, where: str) -> dict[str, tuple[ScalarNode, Node]]:
        """The entries of a mapping node, by key text; duplicate and non-scalar keys rejected."""
        if not isinstance(node, MappingNode):
            raise self.error(f"{where} must be a mapping (key: value lines), got {describe(node)}", node)
        entries: dict[str, tuple[ScalarNode, Node]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                raise self.error(f"keys in {where} must be plain names", key_node)
            key = key_node.value
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise self.error(f"merge keys (<<) are not supported in {where}", key_node)
            if key in entries:
                first = line_of(entries[key][0])
                raise self.error(f"duplicate key {key!r} in {where} (first given on line {first})", key_node)
            entries[key] = (key_node, value_node)
        return entries

    def check_keys(self, entries: Mapping[str, tuple[ScalarNode, Node]], allowed: Iterable[str], where: str) -> None:
        allowed = tuple(allowed)
        for key, (key_node, _) in entries.items():
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    f"unknown key {key!r} in {where} (expected one of: {', '.join(allowed)}){hint}", key_node
                )

    def require(self, entries: Mapping[str, tuple[ScalarNode, Node]], key: str, where: str, line: int) -> Node:
        if key not in entries or is_null(entries[key][1]):
            raise self.error(f"{where}.{key} is required" if where else f"{key!r} is required", line)
        return entries[key][1]

    def scalar(self, node: Node) -> Any:
        try:
            return self._constructor.construct_object(node, deep=True)
        except ConstructorError as exc:  # e.g. an invalid timestamp
            raise self.error(f"invalid value: {exc.problem}", node) from None
        except (ValueError, KeyError, TypeError, RecursionError) as exc:  # e.g. `!!int abc`, a huge integer
            raise self.error(f"invalid value: {type(exc).__name__}: {str(exc)[:100]}", node) from None

    def string(self, node: Node, where: str, *, allow_empty: bool = False) -> str:
        if not isinstance(node, ScalarNode) or node.tag != STR_TAG:
            hint = " (put it in quotes)" if isinstance(node, ScalarNode) else ""
            raise self.error(f"{where} must be a string, got {describe(node)}{hint}", node)
        value = str(node.value)
        if not allow_empty and not value.strip():
            raise self.error(f"{where} must not be empty", node)
        return value

    def env_string(self, node: Node, where: str) -> str:
        text = self.string(node, where)
        try:
            value = expand_env(text, self.env)
        except KeyError as exc:
            raise self.error(f"{where}: environment variable {exc.args[0]} is not set", node) from None
        except ValueError as exc:
            raise self.error(f"{where}: {exc}", node) from None
        if not value:
            raise self.error(f"{where} is empty after expanding environment variables", node)
        return value

    def integer(self, node: Node, where: str, *, minimum: int) -> int:
        if not isinstance(node, ScalarNode) or node.tag != INT_TAG:
            raise self.error(f"{where} must be a whole number, got {describe(node)}", node)
        value = self.scalar(node)
        assert isinstance(value, int)
        if value < minimum:
            raise self.error(f"{where} must be at least {minimum}, got {value}", node)
        return value

    def number(self, node: Node, where: str, *, positive: bool) -> float:
        if not isinstance(node, ScalarNode) or node.tag not in (INT_TAG, FLOAT_TAG):
            raise self.error(f"{where} must be a number of seconds, got {describe(node)}", node)
        value = _to_float(self.scalar(node))
        if not math.isfinite(value):
            raise self.error(f"{where} must be a finite number, got {node.value}", node)
        if value < 0 or (positive and value == 0):
            bound = "greater than 0" if positive else "0 or more"
            raise self.error(f"{where} must be {bound}, got {node.value}", node)
        return value

    def fraction(self, node: Node, where: str) -> float:
        """A number greater than 0 and at most 1 (0.5 is a half)."""
        if not isinstance(node, ScalarNode) or node.tag not in (INT_TAG, FLOAT_TAG):
            raise self.error(f"{where} must be a fraction such as 0.5, got {describe(node)}", node)
        value = _to_float(self.scalar(node))
        if not 0 < value <= 1:  # NaN fails too
            raise self.error(f"{where} must be greater than 0 and at most 1 (0.5 is a half), got {node.value}", node)
        return value

    def boolean(self, node: Node, where: str) -> bool:
        if not isinstance(node, ScalarNode) or node.tag != BOOL_TAG:
            raise self.error(f"{where} must be true or false, got {describe(node)}", node)
        return bool(self.scalar(node))

    def string_list(self, node: Node, where: str) -> list[tuple[str, Node]]:
        if is_null(node):
            return []
        if not isinstance(node, SequenceNode):
            raise self.error(f'{where} must be a list of strings, e.g. ["a", "b"]', node)
        return [(self.string(item, f"{where}[{i}]"), item) for i, item in enumerate(node.value)]

    def http_url(self, node: Node, where: str) -> str:
        text = self.string(node, where).strip()
        problem = _http_url_problem(text)
        if problem:
            raise self.error(f"{where}: {problem}", node)
        return text


def _http_url_problem(text: str) -> str | None:
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        return f"{text!r} is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return f"{text!r} must start with http:// or https://"
    if not parts.hostname:
        return f"{text!r} has no host"
    if port == 0:
        return f"{text!r} has port 0"
    if parts.fragment:
        return f"{text!r} must not have a #fragment"
    if any(c.isspace() for c in text):
        return f"{text!r} contains whitespace"
    return None


def _to_float(value: int | float) -> float:
    """A YAML number as a float; an integer too large for one is infinite (then refused as such)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == NULL_TAG


def describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, ScalarNode):
        kinds = {INT_TAG: "a number", FLOAT_TAG: "a number", BOOL_TAG: "a boolean", NULL_TAG: "nothing"}
        kind = kinds.get(node.tag, "a string")
        return f"{kind} ({node.value!r})" if node.tag != NULL_TAG else kind
    return "an unknown node"


def compose_yaml(text: str, file: str) -> Node | None:
    """Compose one YAML document into nodes; YAML errors become ConfigError with their line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file, line=1) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=file, line=1) from None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


#: A DNS host name (letters, digits, hyphens; dot-separated labels).
HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?$", re.IGNORECASE)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def join_host_port(host: str, port: int) -> str:
    """``host:port``, IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_path(base: Path, text: str) -> Path:
    """An absolute path; relative ones are taken relative to ``base``. Symlinks are kept as they are
    (a Kubernetes ConfigMap swaps a ``..data`` symlink, so resolving it would pin an old version)."""
    path = Path(os.path.expanduser(text))
    return Path(os.path.abspath(path if path.is_absolute() else base / path))
