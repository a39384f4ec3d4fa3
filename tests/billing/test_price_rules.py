"""The price table's rule forms (``by_argument``, ``per_unit``, ``metered``, ``free_calls_per_day``):
what each quote holds and costs, exactly in millicents, and the line-numbered errors check-config gives."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.billing.pricing import PriceTable, parse_prices
from gateway.billing.rules import BadUnits, PriceRule, parse_report
from gateway.errors import ConfigError
from tests.harness import write_config

SERVERS = ("docs",)

ISSUE_EXAMPLE = """\
docs:
  free_calls_per_day: 0
  tools:
    lookup: 1
    summarize:
      price: 2
      by_argument:
        - when: {model: "large"}
          price: 10
      per_unit:
        argument: pages
        price: 0.5
        max_units: 200
    translate:
      metered: true
      max: 50
      price: 5
      free_calls_per_day: 3
"""


def parse(text: str) -> PriceTable:
    return parse_prices(textwrap.dedent(text), source="prices.yaml", servers=SERVERS)


def rule(table: PriceTable, name: str, kind: str = "tool") -> PriceRule:
    price = table.price_of("docs", kind, name)  # type: ignore[arg-type]
    assert isinstance(price, PriceRule)
    return price


def test_the_issues_example_parses_and_flat_prices_stay_plain_integers() -> None:
    table = parse(ISSUE_EXAMPLE)
    assert table.price_of("docs", "tool", "lookup") == 1000
    summarize = rule(table, "summarize")
    assert summarize.quote({"model": "large", "pages": 3}).hold == 11_500
    assert summarize.quote({"model": "small", "pages": 0}).hold == 2000
    translate = rule(table, "translate")
    assert translate.quote({}) == translate.quote({"anything": 1})
    assert (translate.quote({}).hold, translate.quote({}).price, translate.free_calls_per_day) == (50_000, 5000, 3)
    assert table.lookup("docs", "tool", "summarize") == 2000  # the least it can cost
    assert table.lookup("docs", "tool", "translate") == 0  # a metered upstream may report 0


def test_a_long_hand_flat_price_is_a_plain_integer_on_the_hot_path() -> None:
    table = parse("docs:\n  tools:\n    lookup: {price: 0.25}\n")
    assert table.price_of("docs", "tool", "lookup") == 250


def test_per_unit_amounts_are_exact_millicents() -> None:
    table = parse(
        "docs:\n  tools:\n    t:\n      price: 0\n      per_unit: {argument: n, price: 0.001, max_units: 1000000}\n"
    )
    assert rule(table, "t").quote({"n": 999_999}).hold == 999_999
    assert rule(table, "t").most == 1_000_000


@pytest.mark.parametrize("value", [201, -1, True, False, 2.0, "3", None, [3], {"n": 3}])
def test_a_unit_argument_outside_the_rule_is_refused_naming_it(value: Any) -> None:
    summarize = rule(parse(ISSUE_EXAMPLE), "summarize")
    with pytest.raises(BadUnits) as refused:
        summarize.quote({"pages": value})
    assert refused.value.argument == "pages"
    assert "'pages'" in refused.value.message


def test_a_prompts_unit_argument_may_be_a_string_of_digits() -> None:
    table = parse("docs:\n  prompts:\n    p:\n      price: 1\n      per_unit: {argument: n, price: 1, max_units: 5}\n")
    assert rule(table, "p", "prompt").quote({"n": "4"}, strings_count=True).hold == 5000
    with pytest.raises(BadUnits):
        rule(table, "p", "prompt").quote({"n": "6"}, strings_count=True)
    with pytest.raises(BadUnits):
        rule(table, "p", "prompt").quote({"n": "9" * 40}, strings_count=True)
    with pytest.raises(BadUnits):
        rule(table, "p", "prompt").quote({"n": "-1"}, strings_count=True)


def test_when_compares_json_values_without_mixing_booleans_and_numbers() -> None:
    table = parse(
        """\
        docs:
          tools:
            t:
              price: 1
              by_argument:
                - {when: {flag: true}, price: 2}
                - {when: {n: 1}, price: 3}
                - {when: {x: 0.5, s: "1"}, price: 4}
        """
    )
    t = rule(table, "t")
    assert t.quote({"flag": True}).hold == 2000
    assert t.quote({"flag": 1}).hold == 1000
    assert t.quote({"n": True}).hold == 1000
    assert t.quote({"n": 1.0}).hold == 3000
    assert t.quote({"x": 0.5, "s": "1"}).hold == 4000
    assert t.quote({"x": 0.5, "s": 1}).hold == 1000
    assert t.quote({"x": 0.5}).hold == 1000  # all must match


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("    t: {price: 1, colour: red}\n", 3, "unknown key 'colour'"),
        ("    t: {prise: 1}\n", 3, "did you mean 'price'"),
        ("    t:\n      by_argument:\n        - when: {m: a}\n", 3, "needs a price"),
        ("    t:\n      price: 1\n      by_argument:\n        - when: {m: a}\n", 6, "needs a price"),
        ("    t:\n      price: 1\n      by_argument:\n        - price: 2\n", 6, "needs when"),
        ("    t:\n      price: 1\n      by_argument:\n        - {when: {m: [1]}, price: 2}\n", 6, "string, a number"),
        ("    t:\n      price: 1\n      by_argument:\n        - {when: {m: null}, price: 2}\n", 6, "string, a number"),
        ("    t:\n      price: 1\n      by_argument:\n        - {when: {}, price: 2}\n", 6, "names no argument"),
        ("    t:\n      price: 1\n      by_argument: {m: a}\n", 5, "must be a list"),
        ("    t:\n      metered: true\n      price: 1\n", 3, "needs max"),
        ("    t:\n      metered: true\n      max: 1\n      price: 2\n", 6, "above max"),
        ("    t:\n      metered: yes please\n      max: 1\n      price: 1\n", 4, "true or false"),
        ("    t:\n      max: 1\n      price: 1\n", 4, "only for metered"),
        ("    t:\n      price: 1\n      per_unit: {argument: n, price: 1, max_units: 0}\n", 5, "from 1"),
        ("    t:\n      price: 1\n      per_unit: {argument: n, price: 1}\n", 5, "needs max_units"),
        ("    t:\n      price: 1\n      per_unit: {argument: n, price: 1, max_units: 2, unit: x}\n", 5, "'unit'"),
        ("    t:\n      price: 1\n      per_unit: {argument: 3, price: 1, max_units: 2}\n", 5, "name of an argument"),
        ("    t:\n      price: 1\n      per_unit: {argument: n, price: -1, max_units: 2}\n", 5, "negative"),
        ("    t:\n      price: 1\n      free_calls_per_day: -1\n", 5, "whole number"),
        (
            "    t:\n      metered: true\n      max: 5\n      price: 1\n      by_argument:\n"
            "        - {when: {m: a}, price: 9}\n",
            8,
            "above max",
        ),
        (
            "    t:\n      price: 1\n      per_unit: {argument: n, price: 1000000000000, max_units: 1000}\n",
            3,
            "over the most",
        ),
        (
            "    t:\n      metered: true\n      max: 9\n      price: 1\n"
            "      per_unit: {argument: n, price: 1, max_units: 2}\n",
            7,
            "cannot also have per_unit",
        ),
    ],
)
def test_check_config_refuses_a_broken_rule_with_its_line(text: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse("docs:\n  tools:\n" + text)
    assert info.value.line == line, info.value.message
    assert words in info.value.message


def test_resources_take_no_argument_rules_but_may_be_metered() -> None:
    with pytest.raises(ConfigError) as info:
        parse(
            "docs:\n  resources:\n    'r://*':\n      price: 1\n      per_unit: {argument: n, price: 1, max_units: 2}\n"
        )
    assert info.value.line == 5 and "no arguments" in info.value.message
    table = parse("docs:\n  resources:\n    'r://*':\n      metered: true\n      max: 3\n      price: 1\n")
    assert rule(table, "r://x", "resource").quote({}).hold == 3000


def test_a_server_level_allowance_is_a_whole_number() -> None:
    assert parse("docs:\n  free_calls_per_day: 5\n").prices_of("docs").free_calls_per_day == 5
    with pytest.raises(ConfigError) as info:
        parse("docs:\n  free_calls_per_day: 2.5\n")
    assert info.value.line == 2


def test_a_table_with_only_an_allowance_on_a_free_server_has_no_prices_but_a_rule_does() -> None:
    assert not parse("docs:\n  tools:\n    t: {price: 0, free_calls_per_day: 1}\n").has_prices("docs")
    assert parse("docs:\n  tools:\n    t: {metered: true, max: 1, price: 0}\n").has_prices("docs")


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        ({"_meta": {"io.agentpay/charge": {"amount_cents": "12.5"}}}, (12_500, None)),
        ({"_meta": {"io.agentpay/charge": {"amount_cents": 7}}}, (7000, None)),
        ({"_meta": {"io.agentpay/charge": {"amount_cents": 0.001}}}, (1, None)),
        ({"_meta": {}}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_a_metered_report_is_read_with_the_tables_decimal_rules(result: Any, expected: Any) -> None:
    assert parse_report(result) == expected


@pytest.mark.parametrize("amount", ["-1", -1, "1.0001", True, None, "1e3", 1e-05, float("nan"), "", [1]])
def test_a_malformed_metered_report_says_why(amount: Any) -> None:
    reported, problem = parse_report({"_meta": {"io.agentpay/charge": {"amount_cents": amount}}})
    assert reported is None and problem


def test_check_config_prints_the_line_of_a_broken_rule(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    (tmp_path / "prices.yaml").write_text("weather:\n  tools:\n    t:\n      metered: true\n      price: 1\n")
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "prices.yaml:3" in done.stderr and "needs max" in done.stderr
