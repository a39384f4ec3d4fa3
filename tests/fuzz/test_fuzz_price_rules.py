"""Fuzzing the price table's rule forms (``by_argument``, ``per_unit``, ``metered``,
``free_calls_per_day``) and the metered report reader.

Contracts: a rule written in YAML parses to a table or raises ``ConfigError`` with a line (never
anything else); a parsed rule quotes any JSON arguments as an ``int`` hold of millicents between its
least and most (or refuses with ``BadUnits`` naming its unit argument), a metered quote never holds
less than it charges; ``parse_report`` on any JSON value gives non-negative millicents, nothing, or a
reason — never an exception.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.billing import pricing
from gateway.billing.rules import BadUnits, PriceRule, parse_report
from gateway.errors import ConfigError
from tests.fuzz.common import assert_clear, fuzz, tried

SERVERS = ("weather",)

# Mostly valid values, so that most drawn rules parse and get quoted; the rest exercise the errors.
GOOD_AMOUNTS = ["0", "1", "0.5", "2.125", "10", "60", "0.001"]
amounts = st.sampled_from(GOOD_AMOUNTS * 6 + ["0.0001", "-1", "abc", "1e3", "", "null", "[1]"])
counts = st.sampled_from(["0", "1", "3", "200"] * 6 + ["-1", "2.5", "x", "null", "99999999999"])
when_values = st.sampled_from(
    ['"large"', "true", "false", "3", "2.5", "'x'"] * 4 + ["null", "[1]", "{a: 1}", ".nan", "2001-01-01"]
)
arg_names = st.sampled_from(["model", "pages", "fast", "n", ""])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
rule_keys = st.sampled_from(["by_argument", "per_unit", "metered", "free_calls_per_day"] * 5 + ["max", "colour"])


@st.composite
def rule_yaml(draw: st.DrawFn) -> str:
    """One tool's price written as a mapping: any subset of the fields, valid or not."""
    keys = draw(st.lists(rule_keys, unique=True, max_size=4))
    if draw(st.integers(0, 9)):
        keys.insert(0, "price")
    if "metered" in keys and draw(st.integers(0, 9)) and "max" not in keys:
        keys.append("max")
    lines = []
    for key in keys:
        if key == "price":
            lines.append(f"price: {draw(amounts)}")
        elif key == "max":
            lines.append(f"max: {draw(st.sampled_from(['60', '100', *GOOD_AMOUNTS, '-1']))}")
        elif key == "free_calls_per_day":
            lines.append(f"{key}: {draw(counts)}")
        elif key == "metered":
            lines.append(f"metered: {draw(st.sampled_from(['true'] * 6 + ['false', 'yes', '1', 'maybe']))}")
        elif key == "by_argument":
            lines.append("by_argument:")
            for _ in range(draw(st.integers(0, 3))):
                when = ", ".join(
                    f"{draw(arg_names) or 'x'}: {draw(when_values)}" for _ in range(draw(st.integers(0, 2)))
                )
                parts = [f"when: {{{when}}}"] if draw(st.integers(0, 5)) else []
                if draw(st.integers(0, 5)):
                    parts.append(f"price: {draw(amounts)}")
                lines.append(f"  - {{{', '.join(parts)}}}")
        elif key == "per_unit":
            fields = []
            if draw(st.integers(0, 9)):
                fields.append(f"argument: {draw(arg_names) or '3'}")
            if draw(st.integers(0, 9)):
                fields.append(f"price: {draw(amounts)}")
            if draw(st.integers(0, 9)):
                fields.append(f"max_units: {draw(counts)}")
            lines.append(f"per_unit: {{{', '.join(fields)}}}")
        else:
            lines.append(f"{key}: red")
    body = "\n".join("      " + line for line in lines) if lines else "      {}"
    section = draw(st.sampled_from(["tools", "tools", "tools", "prompts", "resources"]))
    allowance = draw(st.sampled_from(["", "", "", "  free_calls_per_day: 2\n", "  free_calls_per_day: -2\n"]))
    return f"weather:\n{allowance}  {section}:\n    t:\n{body}\n"


@fuzz(600)
@given(text=rule_yaml(), arguments=st.dictionaries(arg_names, json_values, max_size=4))
def test_rules_parse_or_fail_with_a_line_and_quote_within_their_bounds(text: str, arguments: dict[str, Any]) -> None:
    tried("pricing rules")
    try:
        table = pricing.parse_prices(text, source="prices.yaml", servers=SERVERS)
    except ConfigError as exc:
        assert_clear(exc)
        assert isinstance(exc.line, int) and 1 <= exc.line <= text.count("\n") + 1, (exc.line, text)
        return
    for kind in ("tool", "prompt", "resource"):
        price = table.price_of("weather", kind, "t")
        assert table.lookup("weather", kind, "t") == pricing.floor_of(price)
        if isinstance(price, int):
            assert price >= 0
            continue
        assert isinstance(price, PriceRule)
        assert 0 <= price.least <= price.most
        try:
            quote = price.quote(arguments, strings_count=kind == "prompt")
        except BadUnits as exc:
            assert price.per_unit is not None and exc.argument == price.per_unit.argument
            continue
        assert type(quote.hold) is int and price.least <= quote.hold <= price.most
        assert quote.price <= quote.hold
        assert quote.metered == price.metered


@fuzz(800)
@given(value=json_values)
def test_a_metered_report_is_read_or_refused_never_raising(value: Any) -> None:
    tried("rules.parse_report")
    result = {"_meta": {"io.agentpay/charge": value}}
    reported, problem = parse_report(json.loads(json.dumps(result, allow_nan=True)))
    if reported is None:
        return
    assert problem is None and type(reported) is int and reported >= 0
