"""Run `agentpay serve` as a real OS process on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class GatewayProcess:
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path

    def url(self, server: str = "weather") -> str:
        return f"http://127.0.0.1:{self.port}/{server}/mcp"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def exited(self) -> int:
        async with asyncio.timeout(30):
            return await self.proc.wait()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(30):
            return await self.proc.wait()


async def wait_ready(port: int, proc: asyncio.subprocess.Process, log_path: Path, scheme: str = "http") -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(20):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                async with http.get(f"{scheme}://127.0.0.1:{port}/readyz", ssl=False) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)  # polling a process we do not control; bounded by the timeout


@asynccontextmanager
async def run_gateway_process(
    config_path: Path, scheme: str = "http", serve_args: Sequence[str] = ()
) -> AsyncIterator[GatewayProcess]:
    port = free_port()
    config = yaml.safe_load(config_path.read_text())
    config["listen"] = f"127.0.0.1:{port}"
    config.setdefault("admin_listen", None)  # tests that want the admin API give it a free port
    config.setdefault("log_format", "json")
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = config_path.parent / f"gateway-{port}.log"
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(config_path),
            "serve",
            *serve_args,
            stdout=log_file,
            stderr=log_file,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    gp = GatewayProcess(proc, port, log_path)
    try:
        await wait_ready(port, proc, log_path, scheme)
        yield gp
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
