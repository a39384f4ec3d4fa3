"""The operator CLI, run as a real subprocess against a real SQLite file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import write_config


def agentpay(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway"]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, check=False
    )


def ok_json(*args: str, config: Path) -> Any:
    done = agentpay(*args, "--json", config=config)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})


def test_an_operator_can_create_accounts_top_up_issue_and_revoke_keys(config: Path) -> None:
    assert ok_json("developers", "create", "acme", config=config)["developer"] == "acme"
    user = ok_json("users", "create", "alice", "--balance-cents", "2.5", config=config)
    assert user["balance_cents"] == "2.5"
    topped = ok_json("users", "topup", "alice", "100", "--reference", "invoice-1", config=config)
    again = ok_json("users", "topup", "alice", "100", "--reference", "invoice-1", config=config)
    assert topped["balance_cents"] == "102.5"
    assert again["replayed"] is True and again["balance_cents"] == "102.5"
    key = ok_json(
        "keys", "create", "--user", "alice", "--server", "weather", "--spend-limit-cents", "50", config=config
    )
    assert key["key"].startswith("ap_") and key["key"].startswith(key["prefix"])
    assert {"id", "key", "prefix", "user", "server"} <= key.keys()
    listed = ok_json("keys", "list", "--user", "alice", config=config)
    assert [k["id"] for k in listed] == [key["id"]]
    assert key["key"] not in json.dumps(listed)
    shown = ok_json("users", "show", "alice", config=config)
    assert shown["available_cents"] == "102.5" and shown["held_cents"] == "0"
    revoked = ok_json("keys", "revoke", key["prefix"], config=config)
    assert revoked["revoked_at"] is not None
    assert ok_json("earnings", "acme", config=config) == {
        "developer": "acme",
        "earnings_cents": "0",
        "lifetime_cents": "0",
    }
    assert ok_json("ledger", "verify", config=config)["ok"] is True


def test_the_config_flag_is_accepted_after_the_command_and_from_the_environment(config: Path) -> None:
    done = agentpay("developers", "create", "acme", "--config", str(config))
    assert done.returncode == 0, done.stderr
    done = agentpay("users", "create", "bob", env={"AGENTPAY_CONFIG": str(config)})
    assert done.returncode == 0, done.stderr


def test_errors_are_one_line_without_a_traceback_and_exit_non_zero(config: Path) -> None:
    done = agentpay("users", "topup", "nobody", "5", config=config)
    assert done.returncode == 1
    assert done.stderr.startswith("agentpay: error:") and "nobody" in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    bad_amount = agentpay("users", "create", "carol", "--balance-cents", "1.0001", config=config)
    assert bad_amount.returncode == 1 and "3 decimal places" in bad_amount.stderr


def test_an_amount_or_expiry_written_with_digits_other_than_ascii_is_refused(config: Path) -> None:
    ok_json("users", "create", "alice", config=config)
    done = agentpay("users", "topup", "alice", "\uff15", config=config)  # fullwidth five
    assert done.returncode == 1 and "ASCII digits" in done.stderr
    assert ok_json("users", "show", "alice", config=config)["balance_cents"] == "0"
    done = agentpay("keys", "create", "--user", "alice", "--server", "weather", "--expires", "\uff130d", config=config)
    assert done.returncode == 1 and "is not a duration" in done.stderr


def test_a_key_for_an_unknown_server_is_refused(config: Path) -> None:
    ok_json("users", "create", "alice", config=config)
    done = agentpay("keys", "create", "--user", "alice", "--server", "wether", config=config)
    assert done.returncode == 1 and "'wether'" in done.stderr


def test_check_config_names_the_file_and_line_of_a_problem(tmp_path: Path, config: Path) -> None:
    (tmp_path / "prices.yaml").write_text("weather:\n  tools:\n    get_forecast: 0.0001\n")
    done = agentpay("check-config", config=config)
    assert done.returncode == 1
    assert "prices.yaml:3" in done.stderr


def test_check_config_and_serve_refuse_an_owner_that_does_not_exist(config: Path) -> None:
    done = agentpay("check-config", config=config)
    assert done.returncode == 1
    assert "owner 'acme' does not exist" in done.stderr and "developers create acme" in done.stderr
    served = agentpay("serve", config=config)
    assert served.returncode == 1 and "owner 'acme'" in served.stderr
    ok_json("developers", "create", "acme", config=config)
    assert agentpay("check-config", config=config).returncode == 0


def test_ledger_verify_exits_non_zero_on_a_corrupted_ledger(tmp_path: Path, config: Path) -> None:
    import sqlite3

    ok_json("users", "create", "alice", "--balance-cents", "10", config=config)
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        db.execute("UPDATE accounts SET balance = balance + 1000 WHERE kind = 'user'")
    done = agentpay("ledger", "verify", "--json", config=config)
    assert done.returncode == 1
    assert json.loads(done.stdout)["violations"]


async def _charge_once(config: Path) -> str:
    from gateway.config import load_config
    from gateway.ledger import open_ledger
    from gateway.ledger.base import HoldRequest
    from gateway.money import parse_cents

    ledger = open_ledger(load_config(config).database)
    await ledger.open()
    try:
        result = await ledger.charge(
            HoldRequest("svc_cli", None, "alice", "acme", "weather", "tools/call", "get_forecast",
                        parse_cents("10"), 0, 60, "test")
        )  # fmt: skip
        assert result.charge is not None
        return result.charge.id
    finally:
        await ledger.close()


def test_an_operator_refunds_a_charge_and_exports_the_statement_as_csv(config: Path) -> None:
    import asyncio

    ok_json("developers", "create", "acme", config=config)
    ok_json("users", "create", "alice", "--balance-cents", "50", config=config)
    charge_id = asyncio.run(_charge_once(config))
    refund = ok_json("charges", "refund", charge_id, "--amount-cents", "4", "--reference", "ticket-9", config=config)
    again = ok_json("charges", "refund", charge_id, "--amount-cents", "4", "--reference", "ticket-9", config=config)
    assert refund["amount_cents"] == "4" and again["replayed"] is True
    assert ok_json("users", "show", "alice", config=config)["balance_cents"] == "44"
    payout = ok_json("payouts", "create", "acme", config=config)
    assert payout["amount_cents"] == "6"
    assert ok_json("payouts", "settle", payout["id"], "--reference", "bank-1", config=config)["state"] == "settled"
    csv_out = agentpay("statement", "acme", "--csv", config=config)
    assert csv_out.returncode == 0, csv_out.stderr
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0] == "created_at,kind,amount_cents,server,name,charge_id,transfer_id"
    assert [line.split(",")[1] for line in lines[1:]] == ["payout", "refund", "charge"]
    assert ok_json("ledger", "verify", config=config)["ok"] is True


def test_ten_top_ups_of_a_quadrillion_cents_are_a_clear_error_and_change_nothing(config: Path) -> None:
    assert ok_json("users", "create", "alice", "--balance-cents", "50", config=config)["balance_cents"] == "50"
    for _ in range(10):
        done = agentpay("users", "topup", "alice", "1000000000000000", config=config)
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.startswith(
            "agentpay: error: amount 1000000000000000 cents is over the most one request may move "
            "(1000000000000 cents). Nothing was changed"
        ), done.stderr
        assert len(done.stderr.splitlines()) == 1  # one line, no traceback
    shown = ok_json("users", "show", "alice", config=config)
    assert (shown["balance_cents"], shown["available_cents"]) == ("50", "50")
    verified = agentpay("ledger", "verify", config=config)
    assert verified.returncode == 0, verified.stdout + verified.stderr
