"""The login service as the gateway wires it: built by create_app from the config, opened and
closed with the app, on the ledger's own database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gateway.ledger.base import AccountKind
from tests.harness import run_gateway, write_config


async def test_a_running_gateway_has_logins_in_the_ledgers_database(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": None}, portal={"signup": "open"})
    async with run_gateway(config) as gw:
        logins = gw.rt.logins
        assert logins.signup_policy == "open" and not logins.mail_enabled
        assert logins.base_url == "http://127.0.0.1:8080"
        login = await logins.signup("alice@example.com", "correct horse battery")
        assert (await gw.ledger.get_account(AccountKind.USER, "alice@example.com")).balance == 0
        authenticated = await logins.authenticate("alice@example.com", "correct horse battery", client="127.0.0.1")
        token, session = await logins.open_session(authenticated)
        assert (await logins.session(token)) is not None and login.id == session.login.id
    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        migrations = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
    assert {"logins", "web_sessions", "login_links", "login_failures", "accounts"} <= tables
    assert "logins_0001_initial" in migrations and "0001_initial" in migrations


async def test_without_a_portal_section_signup_is_by_invite(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"weather": None})
    async with run_gateway(config) as gw:
        assert gw.rt.logins.signup_policy == "invite"
