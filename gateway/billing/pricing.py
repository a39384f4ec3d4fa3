"""The price table: what a tool call, a resource read or a prompt costs, per server.

    weather:
      tools:
        get_forecast: 5
        "premium_*": 25        # glob: an exact name wins, then the glob with the most literal characters
      resources:
        "weather://alerts/*": 1
      prompts:
        daily_brief: 2
      default: 0               # price of anything not listed
      free_calls_per_day: 0    # the first N priced calls of each UTC day (per user) cost 0

A name's price is an amount, or a mapping for prices that depend on the request (``by_argument``,
``per_unit``), are reported by the upstream (``metered``) or have their own free allowance: see
``gateway.billing.rules``.

Amounts are cents with up to 3 decimals, parsed from the YAML *source text* of each scalar
(PyYAML never gets to turn ``0.1`` into a float) into integer millicents. Glob patterns use ``*``
(any run of characters, ``/`` included) and ``?`` (one character), case-sensitively. Two globs of
one section with the same number of literal characters that can both match some name are an
error, because neither would win for that name.

Pure: the standard library and PyYAML only.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections import deque
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal, get_args

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.billing.rules import ArgumentRule, PerUnit, PriceRule, Scalar
from gateway.errors import ConfigError
from gateway.ledger.base import MAX_AMOUNT
from gateway.money import AmountError, format_cents, parse_cents

__all__ = [
    "Kind",
    "Price",
    "PriceTable",
    "ServerPrices",
    "glob_literal_count",
    "globs_overlap",
    "is_glob",
    "load_prices",
    "parse_prices",
]

Kind = Literal["tool", "resource", "prompt"]
KINDS: tuple[Kind, ...] = get_args(Kind)
_SECTIONS: dict[str, Kind] = {"tools": "tool", "resources": "resource", "prompts": "prompt"}
_SERVER_KEYS = (*_SECTIONS, "default", "free_calls_per_day")
_RULE_KEYS = ("price", "by_argument", "per_unit", "metered", "max", "free_calls_per_day")
_PER_UNIT_KEYS = ("argument", "price", "max_units")
_ARGUMENT_RULE_KEYS = ("when", "price")
_MAX_ALLOWANCE = 1_000_000_000
_WHEN_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool"))
Price = int | PriceRule  # a flat price in millicents, or a rule


def floor_of(price: Price) -> int:
    """The least a call at ``price`` can cost, in millicents."""
    return price if isinstance(price, int) else price.least


_WILDCARDS = frozenset("*?")


# --------------------------------------------------------------------------------------------
# Globs
# --------------------------------------------------------------------------------------------
def is_glob(name: str) -> bool:
    return any(c in _WILDCARDS for c in name)


def glob_literal_count(pattern: str) -> int:
    """How many characters of a glob are literal (not ``*`` or ``?``): the glob's specificity."""
    return sum(1 for c in pattern if c not in _WILDCARDS)


def glob_match(pattern: str, name: str) -> bool:
    """Whether ``name`` matches ``pattern`` (``*`` any run, ``?`` one character), in linear time.

    Greedy two-pointer matching with backtracking to the last ``*`` only: a regex with several
    ``.*`` would backtrack polynomially on a long caller-chosen name (a tool name or resource URI)."""
    p = n = 0
    star = -1
    mark = 0
    while n < len(name):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == name[n]) and pattern[p] != "*":
            p += 1
            n += 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, n
            p += 1
        elif star != -1:
            p = star + 1
            mark += 1
            n = mark
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def globs_overlap(a: str, b: str) -> bool:
    """Whether some string matches both globs (emptiness of the product automaton)."""
    start = (0, 0)
    seen = {start}
    queue: deque[tuple[int, int]] = deque([start])

    def push(state: tuple[int, int]) -> None:
        if state not in seen:
            seen.add(state)
            queue.append(state)

    def steps(pattern: str, i: int) -> list[tuple[int, str | None]]:
        """Character-consuming moves from position i: (next position, literal char or None=any)."""
        if i == len(pattern):
            return []
        c = pattern[i]
        if c == "*":
            return [(i, None)]
        if c == "?":
            return [(i + 1, None)]
        return [(i + 1, c)]

    while queue:
        i, j = queue.popleft()
        if i == len(a) and j == len(b):
            return True
        # '*' may also match nothing
        if i < len(a) and a[i] == "*":
            push((i + 1, j))
        if j < len(b) and b[j] == "*":
            push((i, j + 1))
        for ni, ca in steps(a, i):
            for nj, cb in steps(b, j):
                if ca is None or cb is None or ca == cb:
                    push((ni, nj))
    return False


@dataclass(frozen=True, slots=True)
class _Glob:
    pattern: str
    literal_count: int
    price: Price

    def matches(self, name: str) -> bool:
        return glob_match(self.pattern, name)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class ServerPrices:
    """The prices of one server: exact names, globs (most specific first) and the default."""

    exact: Mapping[Kind, Mapping[str, Price]]
    globs: Mapping[Kind, tuple[_Glob, ...]]
    default: int = 0
    free_calls_per_day: int = 0  # per user: the first N priced calls of each UTC day cost 0
    has_prices: bool = field(init=False)  # whether anything can cost more than 0

    def __post_init__(self) -> None:
        def paid(price: Price) -> bool:
            return price > 0 if isinstance(price, int) else price.most > 0

        anything = (
            self.default > 0
            or any(paid(p) for names in self.exact.values() for p in names.values())
            or any(paid(g.price) for globs in self.globs.values() for g in globs)
        )
        object.__setattr__(self, "has_prices", anything)

    def price_of(self, kind: Kind, name: str) -> Price:
        price = self.exact.get(kind, _EMPTY).get(name)
        if price is not None:
            return price
        for glob in self.globs.get(kind, ()):
            if glob.matches(name):
                return glob.price
        return self.default

    def lookup(self, kind: Kind, name: str) -> int:
        return floor_of(self.price_of(kind, name))

    def listed(self, kind: Kind) -> dict[str, int]:
        """Every name and glob pattern written for ``kind``, with its (least) price in millicents."""
        out = {name: floor_of(p) for name, p in self.exact.get(kind, _EMPTY).items()}
        out.update((g.pattern, floor_of(g.price)) for g in self.globs.get(kind, ()))
        return out


_EMPTY: Mapping[str, Price] = MappingProxyType({})
_FREE = ServerPrices(exact=MappingProxyType({}), globs=MappingProxyType({}), default=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceTable:
    """All prices, in millicents (int). Servers that are not in the table are free."""

    servers: Mapping[str, ServerPrices] = field(default_factory=lambda: MappingProxyType({}))
    digest: str = hashlib.sha256(b"").hexdigest()  # sha256 hex of the price file's bytes
    source: str = "<empty>"  # where the table came from (the file name)

    def lookup(self, server: str, kind: Kind, name: str) -> int:
        """The price of one call in millicents: exact name, then the most specific glob, then default.
        For a rule: the least a call can cost (``price_of`` gives the rule)."""
        return self.servers.get(server, _FREE).lookup(kind, name)

    def price_of(self, server: str, kind: Kind, name: str) -> Price:
        """What prices one call: a flat price in millicents, or a ``PriceRule``."""
        return self.servers.get(server, _FREE).price_of(kind, name)

    def prices_of(self, server: str) -> ServerPrices:
        return self.servers.get(server, _FREE)

    def has_prices(self, server: str) -> bool:
        """Whether anything of ``server`` can cost more than 0 (False: every call is free)."""
        return self.servers.get(server, _FREE).has_prices

    def default(self, server: str) -> int:
        return self.servers.get(server, _FREE).default

    def listed(self, server: str) -> dict[Kind, dict[str, int]]:
        """What the file lists for ``server``: kind -> name or glob -> millicents (for display)."""
        prices = self.servers.get(server, _FREE)
        return {kind: prices.listed(kind) for kind in KINDS}

    @classmethod
    def empty(cls) -> PriceTable:
        """Everything free."""
        return cls()


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def load_prices(path: Path, servers: Collection[str]) -> PriceTable:
    """Read and validate a price file; ConfigError (with file and line) for anything wrong."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError("price file not found", file=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read price file: {exc.strerror or exc}", file=source) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"price file is not UTF-8 ({exc.reason})", file=source) from None
    return parse_prices(text, source=source, servers=servers, digest=hashlib.sha256(data).hexdigest())


def parse_prices(text: str, *, source: str, servers: Collection[str], digest: str | None = None) -> PriceTable:
    """Validate price-file text. ``servers`` are the configured server names.

    ``digest`` defaults to the sha256 of the UTF-8 text (what ``load_prices`` computes from the bytes).
    """
    if digest is None:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()

    def error(message: str, node: Node | int) -> ConfigError:
        line = node if isinstance(node, int) else node.start_mark.line + 1
        return ConfigError(message, file=source, line=line)

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise ConfigError(
            f"invalid YAML: {exc.problem or exc.context or 'syntax error'}",
            file=source,
            line=mark.line + 1 if mark is not None else 1,
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=source, line=1) from None
    except RecursionError:
        raise ConfigError("invalid YAML: nested too deeply", file=source, line=1) from None
    if root is None:
        # An empty file is refused rather than read as "everything free": a half-written file seen
        # during a hot reload must not make every call free. Write `{}` to mean "no prices".
        raise error("the price file is empty; write {} if nothing has a price", 1)

    def mapping(node: Node, where: str) -> list[tuple[str, ScalarNode, Node]]:
        if not isinstance(node, MappingNode):
            raise error(f"{where} must be a mapping (key: value lines)", node)
        seen: dict[str, int] = {}
        entries: list[tuple[str, ScalarNode, Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                raise error(f"keys in {where} must be plain names", key_node)
            key = str(key_node.value)
            if key in seen:
                raise error(f"duplicate key {key!r} in {where} (first given on line {seen[key]})", key_node)
            seen[key] = key_node.start_mark.line + 1
            entries.append((key, key_node, value_node))
        return entries

    def amount(node: Node, where: str) -> int:
        if not isinstance(node, ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise error(f"{where} must be an amount of cents such as 5 or 0.25", node)
        try:
            return parse_cents(str(node.value))  # the source text, never a float
        except AmountError as exc:
            raise error(f"{where}: {exc}", node) from None

    def unknown_key(key: str, known_keys: tuple[str, ...], where: str, node: Node) -> ConfigError:
        close = difflib.get_close_matches(key, known_keys, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return error(f"unknown key {key!r} in {where} (expected one of: {', '.join(known_keys)}){hint}", node)

    def count(node: Node, where: str, least: int) -> int:
        text = str(node.value) if isinstance(node, ScalarNode) else ""
        if not (text.isascii() and text.isdigit()) or len(text) > 10 or not least <= int(text) <= _MAX_ALLOWANCE:
            raise error(f"{where} must be a whole number from {least} to {_MAX_ALLOWANCE}", node)
        return int(text)

    def flag(node: Node, where: str) -> bool:
        if not isinstance(node, ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            raise error(f"{where} must be true or false", node)
        return bool(SafeConstructor().construct_object(node))

    def when_value(node: Node, where: str) -> Scalar:
        if isinstance(node, ScalarNode) and node.tag in _WHEN_TAGS:
            try:
                value = SafeConstructor().construct_object(node)
            except (ConstructorError, ValueError):
                value = None
            if isinstance(value, str | int | bool) or (isinstance(value, float) and math.isfinite(value)):
                return value
        raise error(f"{where} must be a string, a number or true/false (compared with the argument)", node)

    def rule(node: MappingNode, where: str, kind: Kind, name_node: Node) -> Price:
        """A price written as a mapping; what is missing is reported on the line of its name."""
        fields = {key: (key_node, value) for key, key_node, value in mapping(node, where)}
        for key, (key_node, _) in fields.items():
            if key not in _RULE_KEYS:
                raise unknown_key(key, _RULE_KEYS, where, key_node)
        if "price" not in fields:
            raise error(
                f"{where} needs a price (the base price, or for a metered tool the price of a call "
                "whose result carries no report)",
                name_node,
            )
        price = amount(fields["price"][1], f"{where}.price")
        if kind == "resource":
            for key in ("by_argument", "per_unit"):
                if key in fields:
                    raise error(
                        f"{where}.{key}: a resource read has no arguments; price URIs with globs", fields[key][0]
                    )
        by_argument: list[ArgumentRule] = []
        price_nodes: list[Node] = [fields["price"][1]]  # each base price's node, for errors
        if "by_argument" in fields:
            rules_node = fields["by_argument"][1]
            if not isinstance(rules_node, SequenceNode):
                raise error(f"{where}.by_argument must be a list of rules (- when: {{...}} and price: ...)", rules_node)
            for index, item in enumerate(rules_node.value):
                at = f"{where}.by_argument[{index}]"
                entries = {key: (key_node, value) for key, key_node, value in mapping(item, at)}
                for key, (key_node, _) in entries.items():
                    if key not in _ARGUMENT_RULE_KEYS:
                        raise unknown_key(key, _ARGUMENT_RULE_KEYS, at, key_node)
                if "price" not in entries:
                    raise error(f"{at} needs a price (the base price when it matches)", item)
                if "when" not in entries:
                    raise error(f"{at} needs when: {{argument: value, ...}} (all must be equal)", item)
                when_node = entries["when"][1]
                when = tuple(
                    (arg, when_value(value, f"{at}.when.{arg}")) for arg, _, value in mapping(when_node, f"{at}.when")
                )
                if not when:
                    raise error(f"{at}.when names no argument; a rule that always matches is the base price", when_node)
                by_argument.append(ArgumentRule(when, amount(entries["price"][1], f"{at}.price")))
                price_nodes.append(entries["price"][1])
        per_unit: PerUnit | None = None
        if "per_unit" in fields:
            at = f"{where}.per_unit"
            unit_node = fields["per_unit"][1]
            entries = {key: (key_node, value) for key, key_node, value in mapping(unit_node, at)}
            for key, (key_node, _) in entries.items():
                if key not in _PER_UNIT_KEYS:
                    raise unknown_key(key, _PER_UNIT_KEYS, at, key_node)
            for key in _PER_UNIT_KEYS:
                if key not in entries:
                    raise error(f"{at} needs {key} (argument, price and max_units)", unit_node)
            arg_node = entries["argument"][1]
            if not isinstance(arg_node, ScalarNode) or arg_node.tag != "tag:yaml.org,2002:str" or not arg_node.value:
                raise error(f"{at}.argument must be the name of an argument", arg_node)
            per_unit = PerUnit(
                str(arg_node.value),
                amount(entries["price"][1], f"{at}.price"),
                count(entries["max_units"][1], f"{at}.max_units", 1),
            )
        metered = flag(fields["metered"][1], f"{where}.metered") if "metered" in fields else False
        most = 0
        if metered:
            if "max" not in fields:
                raise error(
                    f"{where} is metered and needs max: the most one call can cost (held before forwarding)", name_node
                )
            most = amount(fields["max"][1], f"{where}.max")
            if per_unit is not None:
                raise error(
                    f"{where}: a metered price cannot also have per_unit (the upstream reports the cost)",
                    fields["per_unit"][0],
                )
            bases = (price, *(r.price for r in by_argument))
            for base, at_node in zip(bases, price_nodes, strict=True):
                if base > most:
                    raise error(
                        f"{where}: price {format_cents(base)} is above max {format_cents(most)} (the most one "
                        "call can cost, which is held); raise max or lower the price",
                        at_node,
                    )
        elif "max" in fields:
            raise error(f"{where}.max is only for metered prices (add metered: true, or remove max)", fields["max"][0])
        free = (
            count(fields["free_calls_per_day"][1], f"{where}.free_calls_per_day", 0)
            if "free_calls_per_day" in fields
            else None
        )
        if not by_argument and per_unit is None and not metered and free is None:
            return price  # just a price, written long-hand: a flat price
        made = PriceRule(
            price=price,
            by_argument=tuple(by_argument),
            per_unit=per_unit,
            metered=metered,
            max=most,
            free_calls_per_day=free,
        )
        if made.most > MAX_AMOUNT:
            raise error(
                f"{where}: the most one call can cost ({format_cents(made.most)}) is over the most one call may "
                f"move ({format_cents(MAX_AMOUNT)}); lower the prices or max_units",
                name_node,
            )
        return made

    known = frozenset(servers)
    configured = sorted(known)
    table: dict[str, ServerPrices] = {}
    for server, key_node, server_node in mapping(root, "the price file"):
        if server not in known:
            close = difflib.get_close_matches(server, configured, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = ", ".join(configured) or "none"
            raise error(f"unknown server {server!r} (configured servers: {listing}){hint}", key_node)
        exact: dict[Kind, Mapping[str, Price]] = {}
        globs: dict[Kind, tuple[_Glob, ...]] = {}
        default = 0
        free_calls = 0
        for key, section_key, section_node in mapping(server_node, server):
            where = f"{server}.{key}"
            if key == "default":
                default = amount(section_node, where)
                continue
            if key == "free_calls_per_day":
                free_calls = count(section_node, where, 0)
                continue
            if key not in _SECTIONS:
                raise unknown_key(key, _SERVER_KEYS, server, section_key)
            kind = _SECTIONS[key]
            names: dict[str, Price] = {}
            patterns: list[tuple[_Glob, ScalarNode]] = []
            if not (isinstance(section_node, ScalarNode) and section_node.tag == "tag:yaml.org,2002:null"):
                for name, name_node, price_node in mapping(section_node, where):
                    if not name:
                        raise error(f"empty name in {where}", name_node)
                    price = (
                        rule(price_node, f"{where}.{name}", kind, name_node)
                        if isinstance(price_node, MappingNode)
                        else amount(price_node, f"{where}.{name}")
                    )
                    if not is_glob(name):
                        names[name] = price
                        continue
                    glob = _Glob(name, glob_literal_count(name), price)
                    for other, other_node in patterns:
                        if other.literal_count == glob.literal_count and globs_overlap(other.pattern, name):
                            raise error(
                                f"ambiguous globs in {where}: {other.pattern!r} (line "
                                f"{other_node.start_mark.line + 1}) and {name!r} have the same number of "
                                f"literal characters ({glob.literal_count}) and can match the same name; "
                                "make one more specific or list the names exactly",
                                name_node,
                            )
                    patterns.append((glob, name_node))
            exact[kind] = MappingProxyType(names)
            ordered = sorted((g for g, _ in patterns), key=lambda g: -g.literal_count)
            globs[kind] = tuple(ordered)
        table[server] = ServerPrices(
            exact=MappingProxyType(exact), globs=MappingProxyType(globs), default=default, free_calls_per_day=free_calls
        )
    return PriceTable(servers=MappingProxyType(table), digest=digest, source=source)
