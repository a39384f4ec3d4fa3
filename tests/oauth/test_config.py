"""The ``oauth:`` section of the gateway config: its keys, defaults and line-numbered errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import OAuthConfig, load_config
from gateway.errors import ConfigError
from tests.test_config import MINIMAL, write


def test_oauth_is_off_by_default_with_the_documented_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL), env={})
    assert config.oauth == OAuthConfig(
        enabled=False,
        issuer=None,
        access_token_ttl_s=3600,
        refresh_token_ttl_s=2592000,
        client_metadata_hosts_allowed=(),
    )


def test_every_oauth_key_is_parsed(tmp_path: Path) -> None:
    text = MINIMAL + (
        "oauth:\n  enabled: true\n  issuer: https://Pay.Example.com/\n  access_token_ttl_s: 600\n"
        '  refresh_token_ttl_s: 86400\n  client_metadata_hosts_allowed: ["127.0.0.1", "cimd.internal"]\n'
    )
    config = load_config(write(tmp_path, text), env={})
    assert config.oauth == OAuthConfig(
        enabled=True,
        issuer="https://pay.example.com",
        access_token_ttl_s=600,
        refresh_token_ttl_s=86400,
        client_metadata_hosts_allowed=("127.0.0.1", "cimd.internal"),
    )


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("  enabled: yes please\n", "oauth.enabled"),
        ("  issuer: https://pay.example.com/auth\n", "must be an origin"),
        ("  issuer: ftp://pay.example.com\n", "oauth.issuer"),
        ("  access_token_ttl_s: 5\n", "oauth.access_token_ttl_s"),
        ('  client_metadata_hosts_allowed: ["not a host"]\n', "not a host name"),
        ("  enable: true\n", "enable"),
    ],
)
def test_a_bad_oauth_value_is_an_error_with_its_line(tmp_path: Path, body: str, says: str) -> None:
    path = write(tmp_path, MINIMAL + "oauth:\n" + body)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert says in str(info.value)
    assert info.value.line == MINIMAL.count("\n") + 2
