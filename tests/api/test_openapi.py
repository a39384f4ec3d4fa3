"""schemathesis against the served OpenAPI documents: no 5xx, responses match the schema."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import yaml

from gateway.api.operations import Operations
from gateway.ledger import open_ledger
from tests.harness import prepare_ledger, write_config
from tests.process import free_port, run_gateway_process

ADMIN_TOKEN = "admin-token-for-schemathesis-0123456789"


async def schemathesis(url: str, token: str, tmp_path: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", url,
        "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
        "--max-examples", "25", "--generation-deterministic", "--phases", "examples,fuzzing",
        "-H", f"Authorization: Bearer {token}", "--request-timeout", "10",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def test_the_service_and_admin_apis_survive_schemathesis(tmp_path: Path) -> None:
    admin_port = free_port()
    config = write_config(
        tmp_path, {"tools": None}, {}, admin_listen=f"127.0.0.1:{admin_port}", admin_token=ADMIN_TOKEN
    )
    await prepare_ledger(config)
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    await ledger.open()
    try:
        ops = Operations(ledger)
        await ops.create_user("alice", "1000")
        await ops.create_key(user="alice", server="tools")
        token = str((await ops.create_token(developer="acme", servers=["tools"]))["token"])
    finally:
        await ledger.close()
    # keep the admin listener: run_gateway_process only defaults it to off
    data = yaml.safe_load(config.read_text())
    assert data["admin_listen"] == f"127.0.0.1:{admin_port}"
    async with run_gateway_process(config) as gw:
        code, out = await schemathesis(f"http://127.0.0.1:{gw.port}/v1/openapi.json", token, tmp_path)
        assert "passed" in out and " 0 passed" not in out
        assert code == 0, out[-4000:]
        code, out = await schemathesis(f"http://127.0.0.1:{admin_port}/v1/openapi.json", ADMIN_TOKEN, tmp_path)
        assert code == 0, out[-4000:]
        assert await gw.stop() == 0
