"""The admin API's ``POST /v1/keys`` takes an optional ``name``; keys answer with ``name`` and
``last_used_at``."""

from __future__ import annotations

from pathlib import Path

from tests.api.test_admin_api import admin, call
from tests.harness import run_gateway, write_config


async def test_the_admin_api_creates_a_named_key_and_refuses_an_unprintable_name(tmp_path: Path) -> None:
    async with run_gateway(write_config(tmp_path, {"weather": None}, {})) as gw, admin(gw) as server:
        await gw.ops.create_user("alice")
        status, key = await call(server, "POST", "/v1/keys", {"user": "alice", "server": "weather", "name": "batch"})
        assert status == 201 and key["name"] == "batch" and key["last_used_at"] is None
        status, body = await call(server, "POST", "/v1/keys", {"user": "alice", "server": "weather", "name": "a\nb"})
        assert status == 400 and body["error"]["code"] == "invalid_input" and "key name" in body["error"]["message"]
        status, listed = await call(server, "GET", "/v1/keys?user=alice")
        assert status == 200 and [(k["id"], k["name"], k["last_used_at"]) for k in listed] == [
            (key["id"], "batch", None)
        ]
