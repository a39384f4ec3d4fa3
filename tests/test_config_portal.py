"""The `portal:` and `smtp:` sections of the config file, and the server names the portal reserves."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import RESERVED_SERVER_NAMES, GatewayConfig, PortalConfig, load_config
from gateway.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

BASE = """\
listen: "127.0.0.1:8080"
database: "sqlite:///agentpay.db"
prices: "prices.yaml"
servers:
  weather:
    upstream: "http://127.0.0.1:9000/mcp"
    owner: acme
"""


def load(tmp_path: Path, extra: str, env: dict[str, str] | None = None, base: str = BASE) -> GatewayConfig:
    path = tmp_path / "gateway.yaml"
    path.write_text(base + textwrap.dedent(extra), encoding="utf-8")
    return load_config(path, env=env or {})


def error(tmp_path: Path, extra: str, env: dict[str, str] | None = None, base: str = BASE) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, extra, env, base)
    return str(raised.value)


def test_without_a_portal_section_signup_is_by_invite_and_links_point_at_listen(tmp_path: Path) -> None:
    config = load(tmp_path, "")
    assert config.portal == PortalConfig(signup="invite", base_url="http://127.0.0.1:8080", session_ttl_s=604800.0)
    assert config.smtp is None


def test_the_portal_section_is_read(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        portal:
          signup: open
          base_url: "https://pay.example.com/"
          session_ttl_s: 3600
        """,
    )
    assert config.portal == PortalConfig(signup="open", base_url="https://pay.example.com", session_ttl_s=3600.0)


def test_the_default_base_url_is_https_when_the_gateway_terminates_tls(tmp_path: Path) -> None:
    config = load(tmp_path, 'tls_cert: "cert.pem"\ntls_key: "key.pem"\n')
    assert config.portal.base_url == "https://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ("portal:\n  signup: sometimes\n", ":9: portal.signup must be one of open, invite, closed, got 'sometimes'"),
        ("portal:\n  sign_up: open\n", ":9: unknown key 'sign_up' in portal"),
        ("portal:\n  base_url: ftp://x\n", ":9: portal.base_url: 'ftp://x' must start with http:// or https://"),
        ("portal:\n  base_url: 'https://x.example/?a=1'\n", ":9: portal.base_url: 'https://x.example/?a=1' must not"),
        ("portal:\n  session_ttl_s: 0\n", ":9: portal.session_ttl_s must be greater than 0"),
        ("portal:\n  session_ttl_s: 2592001\n", ":9: portal.session_ttl_s must be at most 2592000"),
        ("portal: open\n", ":8: portal must be a mapping"),
    ],
)
def test_a_wrong_portal_setting_names_its_line(tmp_path: Path, extra: str, said: str) -> None:
    assert said in error(tmp_path, extra)


def test_the_smtp_section_reads_credentials_from_the_environment(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        smtp:
          host: smtp.example.com
          port: 587
          starttls: true
          from: "AgentPay <billing@example.com>"
          username: "${SMTP_USERNAME}"
          password: "${SMTP_PASSWORD}"
        """,
        env={"SMTP_USERNAME": "mailer", "SMTP_PASSWORD": "s3cret"},
    )
    smtp = config.smtp
    assert (smtp.host, smtp.port, smtp.starttls, smtp.from_addr) == (
        "smtp.example.com",
        587,
        True,
        "AgentPay <billing@example.com>",
    )
    assert (smtp.username, smtp.password) == ("mailer", "s3cret")
    assert "s3cret" not in repr(config)


def test_smtp_defaults_to_port_587_with_starttls_and_no_login(tmp_path: Path) -> None:
    config = load(tmp_path, 'smtp:\n  host: 127.0.0.1\n  from: "billing@example.com"\n')
    smtp = config.smtp
    assert (smtp.port, smtp.starttls, smtp.username, smtp.password) == (587, True, None, None)


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        ('smtp:\n  from: "a@example.com"\n', ":9: smtp.host is required"),
        ("smtp:\n  host: smtp.example.com\n", ":9: smtp.from is required"),
        ('smtp:\n  host: "smtp.example.com:25"\n  from: "a@example.com"\n', ":9: smtp.host: 'smtp.example.com:25'"),
        ('smtp:\n  host: h.example\n  port: 70000\n  from: "a@example.com"\n', ":10: smtp.port must be a number"),
        ('smtp:\n  host: h.example\n  from: "nobody"\n', ":10: smtp.from: 'nobody' is not an address"),
        ('smtp:\n  host: h.example\n  from: "a@example.com"\n  tls: true\n', ":11: unknown key 'tls' in smtp"),
        (
            'smtp:\n  host: h.example\n  from: "a@example.com"\n  starttls: false\n  username: u\n  password: p\n',
            ":11: smtp.username and smtp.password would cross the network unencrypted",
        ),
        (
            'smtp:\n  host: h.example\n  from: "a@example.com"\n  username: u\n',
            "smtp.username and smtp.password must be given together (smtp.password is missing)",
        ),
        (
            'smtp:\n  host: h.example\n  from: "a@example.com"\n  username: u\n  password: "${NOPE}"\n',
            ":12: smtp.password: environment variable NOPE is not set",
        ),
    ],
)
def test_a_wrong_smtp_setting_names_its_line(tmp_path: Path, extra: str, said: str) -> None:
    assert said in error(tmp_path, extra)


@pytest.mark.parametrize("name", ["portal", "oauth", "payments", "static", "v1", "k", ".well-known"])
def test_server_names_the_gateway_uses_are_reserved(tmp_path: Path, name: str) -> None:
    assert name in RESERVED_SERVER_NAMES
    base = BASE.replace("  weather:", f'  "{name}":')
    said = error(tmp_path, "", base=base)
    assert f"server name {name!r} is reserved" in said and ":5:" in said


def test_the_example_config_opens_signup_and_documents_smtp() -> None:
    config = load_config(REPO / "config" / "gateway.yaml", env={})
    assert config.portal.signup == "open" and config.smtp is None
    text = (REPO / "config" / "gateway.yaml").read_text(encoding="utf-8")
    for key in ("base_url", "session_ttl_s", "smtp:", "starttls", "from:", "SMTP_USERNAME", "SMTP_PASSWORD"):
        assert key in text
