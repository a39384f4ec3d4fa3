"""The official MCP conformance suite's authorization-server scenario (``@modelcontextprotocol/conformance``
0.2, ``conformance authorization --url <issuer>``) against the gateway's metadata.

0.2 is published as pre-releases only (0.2.0-alpha.N) and the other conformance tests pin 0.1.16,
which has no ``authorization`` command: this one is installed on its own into
``tests/clients/.npm-oauth`` (gitignored), run with the Node 22 of ``tests/clients/npm.py``."""

from __future__ import annotations

import asyncio
import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.clients.npm import NodeTools, NpmUnavailable, ensure_installed
from tests.oauth.flow import new_person, register, run_oauth_portal
from tests.process import free_port
from tests.upstream_sdk import run_upstream

CONFORMANCE = "0.2.0-alpha.12"
ROOT = Path(__file__).resolve().parents[1] / "clients" / ".npm-oauth"
pytestmark = pytest.mark.timeout(300)


def install(node: NodeTools) -> Path:
    """``conformance`` (pinned) installed once into ROOT; its executable."""
    ROOT.mkdir(parents=True, exist_ok=True)
    binary = ROOT / "node_modules" / ".bin" / "conformance"
    with (ROOT / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = ROOT / "installed.json"
        if binary.exists() and stamp.exists() and json.loads(stamp.read_text()) == CONFORMANCE:
            return binary
        npm = shutil.which("npm", path=str(node.bin) + ":/usr/bin:/bin")
        if npm is None:
            raise NpmUnavailable("npm is not installed")
        (ROOT / "package.json").write_text(json.dumps({"name": "agentpay-oauth-conformance", "private": True}))
        proc = subprocess.run(
            [
                npm,
                "install",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                f"@modelcontextprotocol/conformance@{CONFORMANCE}",
            ],
            cwd=ROOT,
            env=node.env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise NpmUnavailable(f"npm install of the conformance suite failed:\n{proc.stderr[-3000:]}")
        stamp.write_text(json.dumps(CONFORMANCE))
        return binary


@pytest.fixture(scope="module")
def conformance() -> tuple[NodeTools, Path]:
    try:
        node = ensure_installed()
        return node, install(node)
    except NpmUnavailable as exc:
        pytest.fail(f"the conformance suite comes from the npm registry: {exc}")


async def test_the_conformance_suite_passes_the_authorization_server_metadata_scenario(
    conformance: tuple[NodeTools, Path], tmp_path: Path
) -> None:
    node, binary = conformance
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            out = tmp_path / "results"
            proc = await asyncio.create_subprocess_exec(
                str(binary),
                "authorization",
                "--url",
                portal.base,
                "--scenario",
                "authorization-server-metadata-endpoint",
                "-o",
                str(out),
                env=node.env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(120):
                output, _ = await proc.communicate()
            text = output.decode(errors="replace")
            assert proc.returncode == 0, text
            checks = [check for f in out.rglob("checks.json") for check in json.loads(f.read_text())]
            assert checks, text
            assert {c["id"]: c["status"] for c in checks} == {
                "authorization-server-metadata": "SUCCESS",
                "authorization-server-metadata-cimd": "SUCCESS",
            }, text


async def test_the_conformance_suite_passes_the_authorization_code_scenario_with_a_person_approving(
    conformance: tuple[NodeTools, Path], tmp_path: Path
) -> None:
    node, binary = conformance
    async with run_upstream() as upstream:
        async with run_oauth_portal(tmp_path, {"weather": upstream.url}) as portal:
            port = free_port()
            client = await register(portal, f"http://127.0.0.1:{port}/callback")
            person = await new_person(portal, "hal@example.com", "100")
            out = tmp_path / "results"
            proc = await asyncio.create_subprocess_exec(
                str(binary),
                "authorization",
                "--url",
                portal.base,
                "--client-id",
                client.client_id,
                "--resource",
                portal.url("/weather/mcp"),
                "--port",
                str(port),
                "-o",
                str(out),
                env=node.env(BROWSER="true"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            assert proc.stdout is not None
            lines: list[str] = []
            async with asyncio.timeout(120):
                while True:  # the suite prints the URL to open, then waits for its callback
                    line = (await proc.stdout.readline()).decode(errors="replace")
                    assert line, "\n".join(lines)
                    lines.append(line.rstrip())
                    if "/oauth/authorize?" in line:
                        break
                location = await person.answer(line.strip())
                async with aiohttp.ClientSession() as http, http.get(location) as resp:
                    assert resp.status == 200
                output, _ = await proc.communicate()
            text = "\n".join(lines) + output.decode(errors="replace")
            await person.visitor.http.close()
            assert proc.returncode == 0, text
            checks = {c["id"]: c["status"] for f in out.rglob("checks.json") for c in json.loads(f.read_text())}
            assert checks == {
                "authorization-server-metadata": "SUCCESS",
                "authorization-server-metadata-cimd": "SUCCESS",
                "authorization-code-grant": "SUCCESS",
            }, text
