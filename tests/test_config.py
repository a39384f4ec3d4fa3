"""The gateway configuration file: loading, path resolution and line-numbered errors."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from gateway.billing.pricing import load_prices
from gateway.config import (
    GatewayConfig,
    ServerConfig,
    default_sse_upstream,
    load_config,
    parse_listen,
)
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "gateway.yaml"

MINIMAL = """\
listen: "127.0.0.1:8080"
database: "sqlite:///agentpay.db"
prices: "prices.yaml"
servers:
  weather:
    upstream: "http://127.0.0.1:9000/mcp"
    owner: acme
    hosts: ["weather.example.com"]
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=env or {})
    assert info.value.file == str(path)
    return info.value


# --- loading ---------------------------------------------------------------------------------
def test_the_example_config_loads_with_its_price_file() -> None:
    config = load_config(EXAMPLE, env={})
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8080)
    demo = config.servers["demo"]
    assert demo.upstream == "http://127.0.0.1:9000/mcp"
    assert demo.sse_upstream == "http://127.0.0.1:9000/sse"
    assert demo.owner == "demo-dev"
    assert demo.hosts == ("demo.localhost",)
    assert config.prices_path == REPO / "config" / "prices.yaml"
    assert config.database == f"sqlite:///{REPO / 'config' / 'agentpay.db'}"

    table = load_prices(config.prices_path, config.servers.keys())
    assert table.lookup("demo", "tool", "echo") == 0
    assert table.lookup("demo", "tool", "get_forecast") == 5000
    assert table.lookup("demo", "tool", "premium_report") == 25000
    assert table.lookup("demo", "tool", "add") == 1000
    assert table.lookup("demo", "resource", "demo://alerts/eu/today") == 1000
    assert table.lookup("demo", "prompt", "daily_brief") == 2000
    assert table.lookup("demo", "tool", "anything_else") == 0


def test_a_minimal_config_gets_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.path == tmp_path / "gateway.yaml"
    assert config.max_body_bytes == 4 * 1024 * 1024
    assert config.max_batch_items == 100
    assert config.hold_lease_s == 30.0
    assert config.sweep_interval_s == 5.0
    assert config.drain_grace_s == 30.0
    assert config.topup_url is None
    assert config.price_in_description is False
    assert config.allowed_origins == ()
    assert config.trusted_proxies == ()
    assert config.log_format == "auto"
    assert config.admin_listen == "127.0.0.1:8081"
    assert config.admin_token is None
    assert config.key_cache_s == 1.0
    server = config.servers["weather"]
    assert server.connect_timeout_s == 5.0
    assert server.read_timeout_s == 300.0
    assert server.max_connections == 100
    assert server.fee_basis_points == 0
    assert dict(server.upstream_headers) == {}


def test_relative_database_and_price_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "etc" / "agentpay"
    config_dir.mkdir(parents=True)
    path = write(config_dir, MINIMAL.replace("sqlite:///agentpay.db", "sqlite:///data/pay.db"))
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    config = load_config(Path("etc/agentpay/gateway.yaml"), env={})
    assert config.path == path
    assert config.database == f"sqlite:///{config_dir / 'data' / 'pay.db'}"
    assert config.database.startswith("sqlite:////")
    assert config.prices_path == config_dir / "prices.yaml"


def test_absolute_sqlite_paths_and_postgres_urls_are_kept(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL.replace("sqlite:///agentpay.db", "sqlite:////var/ap.db")))
    assert config.database == "sqlite:////var/ap.db"
    pg = "postgresql://ap:secret@db.internal:5432/agentpay"
    config = load_config(write(tmp_path, MINIMAL.replace("sqlite:///agentpay.db", pg)), env={})
    assert config.database == pg
    config = load_config(write(tmp_path, MINIMAL.replace("sqlite:///agentpay.db", "postgres://h/db")), env={})
    assert config.database == "postgres://h/db"


def test_the_config_is_frozen_and_its_server_mapping_read_only(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen_port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.servers["evil"] = config.servers["weather"]  # type: ignore[index]


def test_a_server_without_upstream_is_allowed_for_sdk_use(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            database: "sqlite:///a.db"
            prices: p.yaml
            servers:
              sdkonly:
                owner: acme
            """,
        ),
        env={},
    )
    assert config.servers["sdkonly"].upstream is None
    assert config.servers["sdkonly"].sse_upstream is None
    assert config.servers["sdkonly"].hosts == ()


def test_every_server_option_is_parsed(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """\
            listen: "[::1]:9090"
            database: "sqlite:///a.db"
            prices: p.yaml
            topup_url: "https://pay.example.com/topup"
            price_in_description: true
            allowed_origins: ["https://App.Example.com/"]
            trusted_proxies: ["10.0.0.1", "192.168.0.0/16"]
            log_format: json
            admin_listen: null
            max_body_bytes: 1_048_576
            servers:
              weather:
                upstream: "https://weather.internal/v2/mcp"
                sse_upstream: "https://weather.internal/legacy/sse"
                owner: acme
                hosts: ["Weather.Example.com"]
                connect_timeout_s: 1.5
                read_timeout_s: 60
                max_connections: 10
                platform_fee_percent: 2.5
                upstream_headers:
                  X-Shared-Secret: "${WEATHER_SECRET}"
                  X-Api-Version: 2
            """,
        ),
        env={"WEATHER_SECRET": "s3cret"},
    )
    assert (config.listen_host, config.listen_port, config.listen) == ("::1", 9090, "[::1]:9090")
    assert config.topup_url == "https://pay.example.com/topup"
    assert config.price_in_description is True
    assert config.allowed_origins == ("https://app.example.com",)
    assert config.trusted_proxies == ("10.0.0.1", "192.168.0.0/16")
    assert config.log_format == "json"
    assert config.admin_listen is None
    assert config.max_body_bytes == 1_048_576
    server = config.servers["weather"]
    assert server.sse_upstream == "https://weather.internal/legacy/sse"
    assert server.hosts == ("weather.example.com",)
    assert (server.connect_timeout_s, server.read_timeout_s, server.max_connections) == (1.5, 60.0, 10)
    assert server.fee_basis_points == 250
    assert dict(server.upstream_headers) == {"X-Shared-Secret": "s3cret", "X-Api-Version": "2"}
    assert "s3cret" not in repr(config)
    assert config.server_for_host("WEATHER.example.com:443") is server
    assert config.server_for_host("other.example.com") is None


@pytest.mark.parametrize(
    ("text", "basis_points"),
    [("0", 0), ("2.5", 250), ("2.50", 250), ('"12.34"', 1234), ("100", 10_000), ("0.01", 1)],
)
def test_the_platform_fee_is_read_exactly_as_basis_points(tmp_path: Path, text: str, basis_points: int) -> None:
    config = load_config(write(tmp_path, MINIMAL + f"    platform_fee_percent: {text}\n"), env={})
    assert config.servers["weather"].fee_basis_points == basis_points


@pytest.mark.parametrize("text", ["100.01", "2.555", "-1", "abc", "1e1"])
def test_a_platform_fee_out_of_range_or_too_precise_is_an_error_with_its_line(tmp_path: Path, text: str) -> None:
    error = load_error(tmp_path, MINIMAL + f"    platform_fee_percent: {text}\n")
    assert error.line == 9
    assert "platform_fee_percent" in error.message


def test_the_sse_upstream_defaults_to_sse_beside_the_upstream() -> None:
    assert default_sse_upstream("http://h:9000/mcp") == "http://h:9000/sse"
    assert default_sse_upstream("http://h/a/b/mcp/") == "http://h/a/b/sse"
    assert default_sse_upstream("http://h") == "http://h/sse"
    direct = ServerConfig(name="x", owner="o", upstream="http://h/api/mcp")
    assert direct.sse_upstream == "http://h/api/sse"


def test_listen_accepts_host_port_and_bracketed_ipv6() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("localhost:0") == ("localhost", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ["8080", "::1:8080", "host:", "host:99999", ":8080", "[nonsense]:1", "a b:1"]:
        with pytest.raises(ValueError):
            parse_listen(bad)


# --- environment -----------------------------------------------------------------------------
def test_environment_references_are_expanded_in_headers_and_admin_token(tmp_path: Path) -> None:
    text = MINIMAL.replace('listen: "127.0.0.1:8080"\n', 'listen: "127.0.0.1:8080"\nadmin_token: "${TOK}"\n')
    text += '    upstream_headers:\n      Authorization: "Bearer ${UP_SECRET}"\n'
    config = load_config(write(tmp_path, text), env={"TOK": "admin-123", "UP_SECRET": "abc"})
    assert config.admin_token == "admin-123"
    assert config.servers["weather"].upstream_headers["Authorization"] == "Bearer abc"


def test_a_missing_environment_variable_is_an_error_with_its_line(tmp_path: Path) -> None:
    text = MINIMAL + '    upstream_headers:\n      X-Secret: "${NOT_SET_ANYWHERE}"\n'
    error = load_error(tmp_path, text)
    assert error.line == 10
    assert "NOT_SET_ANYWHERE" in error.message


def test_the_admin_token_environment_variable_overrides_the_file(tmp_path: Path) -> None:
    text = MINIMAL.replace('listen: "127.0.0.1:8080"\n', 'listen: "127.0.0.1:8080"\nadmin_token: from-file\n')
    path = write(tmp_path, text)
    assert load_config(path, env={}).admin_token == "from-file"
    assert load_config(path, env={"AGENTPAY_ADMIN_TOKEN": "from-env"}).admin_token == "from-env"


def test_os_environ_is_used_when_no_env_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTPAY_ADMIN_TOKEN", "tok-from-os")
    assert load_config(write(tmp_path, MINIMAL)).admin_token == "tok-from-os"


# --- errors with file and line ---------------------------------------------------------------
def test_an_unknown_key_is_an_error_naming_file_line_and_the_expected_keys(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL.replace("    upstream:", "    upstrem:"))
    assert error.line == 6
    assert "unknown key 'upstrem' in servers.weather" in error.message
    assert "expected one of: upstream, owner" in error.message
    assert "did you mean 'upstream'" in error.message
    assert str(error).startswith(f"{tmp_path / 'gateway.yaml'}:6: ")


def test_an_unknown_top_level_key_is_an_error_with_its_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + "listne: x\n")
    assert error.line == 9
    assert "unknown key 'listne'" in error.message


@pytest.mark.parametrize("name", ["k", "v1", "metrics", "admin", ".well-known", "openapi.json", "mcp"])
def test_a_reserved_server_name_is_rejected(tmp_path: Path, name: str) -> None:
    error = load_error(tmp_path, MINIMAL.replace("  weather:", f'  "{name}":'))
    assert error.line == 5
    assert "reserved" in error.message or "not allowed" in error.message


@pytest.mark.parametrize("name", ["Weather", "-weather", "we ather", "w" * 64])
def test_a_server_name_outside_the_allowed_pattern_is_rejected(tmp_path: Path, name: str) -> None:
    error = load_error(tmp_path, MINIMAL.replace("  weather:", f'  "{name}":'))
    assert error.line == 5
    assert "not allowed" in error.message


def test_a_host_routed_to_two_servers_is_rejected(tmp_path: Path) -> None:
    text = MINIMAL + '  news:\n    owner: acme\n    hosts: ["WEATHER.example.com"]\n'
    error = load_error(tmp_path, text)
    assert error.line == 11
    assert "'weather.example.com'" in error.message
    assert "servers.weather" in error.message


def test_a_server_without_owner_is_an_error_at_the_server_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL.replace("    owner: acme\n", ""))
    assert error.line == 5
    assert "servers.weather.owner is required" in error.message


@pytest.mark.parametrize("listen", ['"8080"', '"localhost"', "8080", '"::1:8080"', '"host:70000"'])
def test_a_bad_listen_address_is_an_error_with_its_line(tmp_path: Path, listen: str) -> None:
    error = load_error(tmp_path, MINIMAL.replace('"127.0.0.1:8080"', listen))
    assert error.line == 1
    assert "listen" in error.message


@pytest.mark.parametrize("url", ["ftp://h/mcp", "127.0.0.1:9000/mcp", "http://", "http://h:notaport/x"])
def test_an_upstream_that_is_not_an_http_url_is_rejected(tmp_path: Path, url: str) -> None:
    error = load_error(tmp_path, MINIMAL.replace("http://127.0.0.1:9000/mcp", url))
    assert error.line == 6
    assert "servers.weather.upstream" in error.message


@pytest.mark.parametrize(
    ("replace", "by", "line", "words"),
    [
        ('    hosts: ["weather.example.com"]', "    hosts: weather.example.com", 8, "list"),
        ("    owner: acme", "    owner: 42", 7, "string"),
        ("servers:\n", "max_batch_items: many\nservers:\n", 4, "whole number"),
        ("servers:\n", "hold_lease_s: -1\nservers:\n", 4, "greater than 0"),
        ("servers:\n", "log_format: xml\nservers:\n", 4, "log_format"),
        ("servers:\n", "price_in_description: maybe\nservers:\n", 4, "true or false"),
        ("servers:\n", 'trusted_proxies: ["not-an-ip"]\nservers:\n', 4, "CIDR"),
        ("servers:\n", 'allowed_origins: ["https://a.com/path"]\nservers:\n', 4, "origin"),
        ("sqlite:///agentpay.db", "mysql://h/db", 2, "not supported"),
        ("servers:\n", 'listen: "0.0.0.0:1"\nservers:\n', 4, "duplicate key 'listen'"),
    ],
)
def test_wrong_values_are_errors_with_their_line(tmp_path: Path, replace: str, by: str, line: int, words: str) -> None:
    assert replace in MINIMAL
    error = load_error(tmp_path, MINIMAL.replace(replace, by, 1))
    assert error.line == line
    assert words in error.message


def test_missing_required_top_level_keys_are_errors(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL.replace('database: "sqlite:///agentpay.db"\n', ""))
    assert "'database' is required" in error.message
    assert error.line == 1


def test_an_empty_file_is_an_error_with_a_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "# nothing here\n")
    assert error.line == 1
    assert "empty" in error.message


def test_invalid_yaml_is_an_error_with_its_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, MINIMAL + "  broken: [unclosed\n")
    assert error.line is not None and error.line >= 9
    assert "invalid YAML" in error.message


def test_a_missing_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_gateway_config_can_be_built_directly_for_tests(tmp_path: Path) -> None:
    config = GatewayConfig(
        path=tmp_path / "g.yaml",
        listen_host="127.0.0.1",
        listen_port=0,
        database="sqlite:///:memory:",
        prices_path=tmp_path / "p.yaml",
        servers={"s": ServerConfig(name="s", owner="o")},
    )
    with pytest.raises(TypeError):
        config.servers["t"] = ServerConfig(name="t", owner="o")  # type: ignore[index]


@pytest.mark.parametrize("listen", ["127.0.0.1:\uff18\uff10\uff18\uff10", "127.0.0.1:\u0668\u0660\u0668\u0660"])
def test_a_listen_port_in_digits_other_than_ascii_is_refused(listen: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(listen)


def test_a_platform_fee_in_digits_other_than_ascii_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    (tmp_path / "prices.yaml").write_text("weather:\n  default: 0\n")
    path.write_text(
        'listen: "127.0.0.1:8080"\ndatabase: "sqlite:///x.db"\nprices: prices.yaml\nservers:\n  weather:\n'
        '    upstream: "http://127.0.0.1:9000/mcp"\n    owner: acme\n    platform_fee_percent: "\uff12.5"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert ":8:" in str(caught.value) and "platform_fee_percent" in str(caught.value)
