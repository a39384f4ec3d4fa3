"""`agentpay demo` as a real process: its output names the portal and a ready login, and a busy port
is one clear line, as `serve` says it, not a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml

from tests.process import free_port


def demo_config(tmp: Path, port: int, upstream_port: int) -> Path:
    config = {
        "listen": f"127.0.0.1:{port}",
        "database": "sqlite:///ledger.db",
        "prices": "prices.yaml",
        "admin_listen": None,
        "log_format": "json",
        "portal": {"signup": "open"},
        "oauth": {"enabled": True},
        "servers": {"demo": {"upstream": f"http://127.0.0.1:{upstream_port}/mcp", "owner": "demo-dev"}},
    }
    (tmp / "prices.yaml").write_text(yaml.safe_dump({"demo": {"tools": {"get_forecast": "5"}}}))
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_demo(config: Path, upstream_port: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--config",
        str(config),
        "demo",
        "--upstream-port",
        str(upstream_port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_the_demo_prints_the_portal_url_and_a_one_time_sign_in_link_that_works(tmp_path: Path) -> None:
    port, upstream_port = free_port(), free_port()
    proc = await start_demo(demo_config(tmp_path, port, upstream_port), upstream_port)
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(60):
            while not any("/portal/link/" in line for line in lines):
                line = (await proc.stdout.readline()).decode()
                assert line, "the demo exited before printing its portal login"
                lines.append(line.strip())
        output = "\n".join(lines)
        assert f"Portal: http://127.0.0.1:{port}/portal/" in output
        assert "demo@example.com" in output
        assert f"claude mcp add --transport http demo http://127.0.0.1:{port}/demo/mcp" in output  # by URL alone
        link = next(line for line in lines if "/portal/link/" in line)
        async with aiohttp.ClientSession() as http:
            async with http.get(link) as resp:
                assert resp.status == 200
                assert "demo@example.com" in await resp.text()
            async with http.get(f"http://127.0.0.1:{port}/.well-known/oauth-protected-resource/demo/mcp") as resp:
                assert resp.status == 200
                assert (await resp.json())["resource"] == f"http://127.0.0.1:{port}/demo/mcp"
    finally:
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            await proc.wait()


async def test_a_busy_port_stops_the_demo_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        for port, upstream_port in ((taken, free_port()), (free_port(), taken)):
            proc = await start_demo(demo_config(tmp_path, port, upstream_port), upstream_port)
            async with asyncio.timeout(60):
                _, err = await proc.communicate()
            assert proc.returncode == 1
            text = err.decode().strip()
            assert "Traceback" not in text
            assert text.count("\n") == 0, text
            assert text.startswith("agentpay: error:") and "cannot listen" in text and str(taken) in text
