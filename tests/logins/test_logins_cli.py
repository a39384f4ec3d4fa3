"""`agentpay logins invite|list|disable`, run as a real subprocess on a real SQLite file and in a
PostgreSQL schema, and the link it prints working in the login service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import BadCredentials, NotFound
from gateway.ledger import open_ledger
from gateway.ledger.base import AccountKind
from tests.harness import write_config
from tests.ledger.conftest import STORES, StoreSpec
from tests.logins.conftest import cheap_passwords, database_url

PASSWORD = "correct horse battery"


def agentpay(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok_json(*args: str, config: Path) -> Any:
    done = agentpay(*args, "--json", config=config)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(params=STORES)
async def config(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    spec = StoreSpec.fresh(request.param, tmp_path)
    path = write_config(
        tmp_path,
        {"weather": None},
        database=database_url(spec),
        portal={"signup": "open", "base_url": "https://pay.example.com/"},
    )
    try:
        yield path
    finally:
        await spec.drop()


async def test_logins_invite_prints_a_one_time_link_for_existing_accounts(config: Path) -> None:
    assert ok_json("users", "create", "carol", config=config)["user"] == "carol"
    ok_json("developers", "create", "acme", config=config)
    invited = ok_json("logins", "invite", "Carol@Example.com", "--user", "carol", "--developer", "acme", config=config)
    assert set(invited) == {"email", "user", "developer", "url", "expires_at"}
    assert (invited["email"], invited["user"], invited["developer"]) == ("carol@example.com", "carol", "acme")
    assert invited["url"].startswith("https://pay.example.com/portal/link/")
    assert invited["expires_at"].endswith("+00:00")

    from gateway.app import login_service

    loaded = load_config(config)
    ledger = open_ledger(loaded.database)
    await ledger.open()
    service = login_service(loaded, ledger)
    service.passwords = cheap_passwords()
    await service.open()
    try:
        token = invited["url"].rsplit("/", 1)[1]
        login = await service.redeem_link(token, PASSWORD)
        assert login.user == "carol" and login.developer == "acme"
        assert (await service.authenticate("carol@example.com", PASSWORD, client="127.0.0.1")).email
    finally:
        await service.close()
        await ledger.close()

    (listed,) = ok_json("logins", "list", config=config)
    assert listed["email"] == "carol@example.com" and listed["has_password"] is True
    assert listed["last_login_at"] is not None and listed["disabled"] is False
    assert token not in json.dumps(listed)

    disabled = ok_json("logins", "disable", "carol@example.com", config=config)
    assert disabled["disabled"] is True and disabled["email"] == "carol@example.com"

    await ledger.open()
    service = login_service(loaded, ledger)
    await service.open()
    try:
        with pytest.raises(BadCredentials):
            await service.authenticate("carol@example.com", PASSWORD, client="127.0.0.1")
    finally:
        await service.close()
        await ledger.close()


async def test_logins_invite_without_accounts_creates_the_users_own_account(config: Path) -> None:
    invited = ok_json("logins", "invite", "dave@example.com", config=config)
    assert invited["user"] == "dave@example.com" and invited["developer"] is None
    shown = ok_json("users", "show", "dave@example.com", config=config)
    assert shown["balance_cents"] == "0"
    text = agentpay("logins", "list", config=config)
    assert text.returncode == 0 and "email=dave@example.com" in text.stdout


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("logins", "invite", "carol@example.com", "--user", "nobody"), "no user account 'nobody'"),
        (("logins", "invite", "carol@example.com", "--developer", "nobody"), "no developer account 'nobody'"),
        (("logins", "invite", "not-an-email"), "is not an e-mail address"),
        (("logins", "disable", "nobody@example.com"), "no login for nobody@example.com"),
    ],
)
async def test_logins_commands_fail_with_one_line_and_exit_1(config: Path, args: tuple[str, ...], said: str) -> None:
    done = agentpay(*args, config=config)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("agentpay: error: ") and said in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_logins_list_is_empty_on_a_new_database_and_lists_create_no_account(config: Path) -> None:
    assert ok_json("logins", "list", config=config) == []
    ledger = open_ledger(load_config(config).database)
    await ledger.open()
    try:
        with pytest.raises(NotFound):
            await ledger.get_account(AccountKind.USER, "dave@example.com")
    finally:
        await ledger.close()
