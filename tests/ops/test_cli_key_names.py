"""`agentpay keys create --name NAME` and the keys' ``name`` / ``last_used_at`` fields, as ``--json``
and as text (``last_used_at=never`` for a key no call has used)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.ledger import open_ledger
from tests.harness import write_config
from tests.ops.test_cli import agentpay, ok_json


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = write_config(tmp_path, {"weather": "http://127.0.0.1:9/mcp"})
    ok_json("users", "create", "alice", config=path)
    return path


async def test_a_key_created_with_a_name_lists_its_name_and_its_last_use(config: Path) -> None:
    created = ok_json("keys", "create", "--user", "alice", "--server", "weather", "--name", "CI runner", config=config)
    assert created["name"] == "CI runner" and created["last_used_at"] is None
    unnamed = ok_json("keys", "create", "--user", "alice", "--server", "weather", config=config)
    assert unnamed["name"] is None
    listed = ok_json("keys", "list", "--user", "alice", config=config)
    assert [(k["id"], k["name"], k["last_used_at"]) for k in listed] == [
        (created["id"], "CI runner", None),
        (unnamed["id"], None, None),
    ]

    text = agentpay("keys", "list", "--user", "alice", config=config)
    assert text.returncode == 0, text.stderr
    named_line, unnamed_line = text.stdout.splitlines()
    assert 'name="CI runner"' in named_line and "last_used_at=never" in named_line
    assert "name=" not in unnamed_line and "last_used_at=never" in unnamed_line

    ledger = open_ledger(load_config(config).database)
    await ledger.open()
    try:
        await ledger.touch_keys({created["id"]: 1_800_000_000.0})  # what a gateway's flush writes
    finally:
        await ledger.close()
    (used, _) = ok_json("keys", "list", "--user", "alice", config=config)
    assert used["last_used_at"] == "2027-01-15T08:00:00+00:00"
    text = agentpay("keys", "list", "--user", "alice", config=config)
    assert "last_used_at=2027-01-15T08:00:00+00:00" in text.stdout.splitlines()[0]


def test_a_key_name_with_a_control_character_is_a_one_line_error_and_no_key(config: Path) -> None:
    done = agentpay("keys", "create", "--user", "alice", "--server", "weather", "--name", "a\tb", config=config)
    assert done.returncode != 0
    assert done.stderr.startswith("agentpay: error: a key name may hold only printable characters")
    assert len(done.stderr.strip().splitlines()) <= 2 and "Traceback" not in done.stderr
    assert ok_json("keys", "list", config=config) == []
