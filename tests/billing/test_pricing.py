"""The price table: exact amounts, glob precedence and line-numbered errors."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from gateway.billing.pricing import PriceTable, globs_overlap, load_prices, parse_prices
from gateway.errors import ConfigError

SERVERS = ("weather", "news")

WEATHER = """\
weather:
  tools:
    get_forecast: 5
    "premium_*": 25
    "premium_gold_*": 40
    "get_*": 3
  resources:
    "weather://alerts/*": 1
  prompts:
    daily_brief: 2
  default: 0.5
"""


def parse(text: str, servers: tuple[str, ...] = SERVERS) -> PriceTable:
    return parse_prices(textwrap.dedent(text), source="prices.yaml", servers=servers)


def parse_error(text: str, servers: tuple[str, ...] = SERVERS) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, servers)
    assert info.value.file == "prices.yaml"
    return info.value


# --- lookups ---------------------------------------------------------------------------------
def test_an_exact_name_beats_a_matching_glob() -> None:
    table = parse(WEATHER)
    assert table.lookup("weather", "tool", "get_forecast") == 5000  # "get_*" would say 3


def test_the_glob_with_the_most_literal_characters_wins() -> None:
    table = parse(WEATHER)
    assert table.lookup("weather", "tool", "premium_gold_report") == 40_000
    assert table.lookup("weather", "tool", "premium_report") == 25_000
    assert table.lookup("weather", "tool", "get_radar") == 3000


def test_the_glob_order_in_the_file_does_not_matter() -> None:
    text = 'weather:\n  tools:\n    "a*": 1\n    "abc*": 3\n    "ab*": 2\n'
    table = parse(text)
    assert [table.lookup("weather", "tool", n) for n in ("ax", "abx", "abcx")] == [1000, 2000, 3000]


def test_a_star_matches_slashes_and_a_question_mark_one_character() -> None:
    table = parse('weather:\n  resources:\n    "w://a/*": 1\n    "w://b/?": 2\n')
    assert table.lookup("weather", "resource", "w://a/eu/today/x") == 1000
    assert table.lookup("weather", "resource", "w://b/x") == 2000
    assert table.lookup("weather", "resource", "w://b/xy") == 0


def test_globs_are_case_sensitive() -> None:
    table = parse('weather:\n  tools:\n    "premium_*": 25\n')
    assert table.lookup("weather", "tool", "PREMIUM_x") == 0


def test_the_default_applies_to_anything_not_listed() -> None:
    table = parse(WEATHER)
    assert table.lookup("weather", "tool", "unlisted") == 500
    assert table.lookup("weather", "resource", "weather://other") == 500
    assert table.lookup("weather", "prompt", "unlisted") == 500


def test_sections_are_separate_by_kind() -> None:
    table = parse(WEATHER)
    assert table.lookup("weather", "prompt", "daily_brief") == 2000
    assert table.lookup("weather", "tool", "daily_brief") == 500
    assert table.lookup("weather", "resource", "weather://alerts/eu") == 1000


def test_a_configured_server_missing_from_the_file_is_free() -> None:
    table = parse(WEATHER)
    assert table.lookup("news", "tool", "anything") == 0
    assert table.has_prices("weather") is True
    assert table.has_prices("news") is False


def test_a_server_whose_prices_are_all_zero_has_no_prices() -> None:
    assert parse("weather:\n  tools:\n    echo: 0\n  default: 0\n").has_prices("weather") is False


def test_lookups_return_int_millicents_never_floats() -> None:
    table = parse(WEATHER + "news:\n  tools:\n    a: 0.25\n    b: 0.001\n    c: 0.1\n    d: 94.5\n")
    for server, kind, name, expected in [
        ("news", "tool", "a", 250),
        ("news", "tool", "b", 1),
        ("news", "tool", "c", 100),
        ("news", "tool", "d", 94_500),
        ("weather", "tool", "premium_x", 25_000),
        ("weather", "tool", "nothing", 500),
        ("news", "tool", "nothing", 0),
        ("unknown", "tool", "nothing", 0),
    ]:
        price = table.lookup(server, kind, name)  # type: ignore[arg-type]
        assert type(price) is int
        assert price == expected


def test_quarter_cent_is_exactly_250_millicents() -> None:
    assert parse("weather:\n  tools:\n    t: 0.25\n").lookup("weather", "tool", "t") == 250


def test_listed_shows_names_and_globs_with_their_prices() -> None:
    listed = parse(WEATHER).listed("weather")
    assert listed["tool"]["premium_*"] == 25_000
    assert listed["tool"]["get_forecast"] == 5000
    assert listed["resource"] == {"weather://alerts/*": 1000}
    assert listed["prompt"] == {"daily_brief": 2000}
    assert parse(WEATHER).listed("news") == {"tool": {}, "resource": {}, "prompt": {}}


def test_the_digest_is_the_sha256_of_the_file_bytes(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(WEATHER, encoding="utf-8")
    table = load_prices(path, SERVERS)
    assert table.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert table.source == str(path)
    assert parse(WEATHER).digest == table.digest


def test_an_empty_mapping_means_everything_is_free() -> None:
    table = parse("{}\n")
    assert table.lookup("weather", "tool", "x") == 0
    assert parse("weather: {}\n").lookup("weather", "tool", "x") == 0


# --- amount errors ---------------------------------------------------------------------------
def test_more_than_three_decimals_is_an_error_with_its_line() -> None:
    error = parse_error("weather:\n  tools:\n    a: 1\n    b: 0.0001\n")
    assert error.line == 4
    assert "more than 3 decimal places" in error.message
    assert str(error).startswith("prices.yaml:4: ")


@pytest.mark.parametrize("amount", ["1e3", "abc", "0x10", "1_000", ".5", "1.", "inf", ".nan", "true", "[1]", '""'])
def test_a_non_numeric_amount_is_an_error_with_its_line(amount: str) -> None:
    error = parse_error(f"weather:\n  tools:\n    t: {amount}\n")
    assert error.line == 3
    assert "weather.tools.t" in error.message


def test_a_negative_amount_is_an_error() -> None:
    error = parse_error("weather:\n  default: -1\n")
    assert error.line == 2
    assert "negative" in error.message


def test_a_missing_amount_is_an_error() -> None:
    assert parse_error("weather:\n  tools:\n    t:\n").line == 3


# --- structure errors ------------------------------------------------------------------------
def test_an_unknown_server_is_an_error_with_its_line_and_the_configured_servers() -> None:
    error = parse_error(WEATHER + "wether:\n  default: 1\n")
    assert error.line == 12
    assert "unknown server 'wether' (configured servers: news, weather)" in error.message


def test_an_unknown_key_at_server_level_is_an_error_with_its_line() -> None:
    error = parse_error("weather:\n  tools: {}\n  tool:\n    a: 1\n")
    assert error.line == 3
    assert "unknown key 'tool'" in error.message
    assert "tools, resources, prompts, default" in error.message


def test_equal_literal_globs_that_can_match_the_same_name_are_an_error() -> None:
    error = parse_error('weather:\n  tools:\n    "a*": 1\n    "*b": 2\n')
    assert error.line == 4
    assert "ambiguous" in error.message
    assert "'a*' (line 3)" in error.message


def test_equal_literal_globs_that_never_match_the_same_name_are_fine() -> None:
    table = parse('weather:\n  tools:\n    "get_*": 1\n    "put_*": 2\n')
    assert table.lookup("weather", "tool", "get_x") == 1000
    assert table.lookup("weather", "tool", "put_x") == 2000


def test_globs_in_different_sections_never_clash() -> None:
    parse('weather:\n  tools:\n    "a*": 1\n  prompts:\n    "*b": 2\n')


def test_glob_overlap_is_decided_exactly() -> None:
    assert globs_overlap("a*", "*b")  # "ab"
    assert globs_overlap("a?c", "?b?")  # "abc"
    assert not globs_overlap("a?c", "?bd")
    assert not globs_overlap("get_*", "list_*")
    assert globs_overlap("*", "x")
    assert not globs_overlap("a", "b")
    assert globs_overlap("*x*", "*y*")  # "xy"


def test_a_duplicate_name_is_an_error() -> None:
    error = parse_error("weather:\n  tools:\n    a: 1\n    a: 2\n")
    assert error.line == 4
    assert "duplicate" in error.message


def test_a_section_that_is_not_a_mapping_is_an_error() -> None:
    assert parse_error("weather:\n  tools: [a, b]\n").line == 2
    assert parse_error("- weather\n").line == 1


def test_an_empty_file_is_an_error_not_free_calls() -> None:
    error = parse_error("# nothing yet\n")
    assert error.line == 1
    assert "empty" in error.message


def test_invalid_yaml_is_an_error_with_its_line() -> None:
    error = parse_error("weather:\n  tools:\n    a: [1\n  default: 0\n")
    assert error.line is not None and error.line >= 3


def test_a_missing_price_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_prices(tmp_path / "missing.yaml", SERVERS)


def test_the_table_is_immutable() -> None:
    table = parse(WEATHER)
    with pytest.raises(TypeError):
        table.servers["news"] = table.servers["weather"]  # type: ignore[index]
