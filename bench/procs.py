"""Processes of the benchmark: start on a free loopback port, wait until ready, measure memory, stop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _status_kb(pid: int, field_name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return sorted(set(out))


def tree_kb(pid: int, field_name: str = "VmHWM") -> int:
    """Sum over the process tree of VmHWM (peak resident set) or VmRSS (current), in KiB."""
    return sum(_status_kb(p, field_name) for p in descendants(pid))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in descendants(pid):
        try:
            parts = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return total


@dataclass
class Proc:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = None
    peak_kb: int = 0  # the tree's peak RSS, kept across restarts of forked workers

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                cwd=self.cwd or ROOT,
                start_new_session=True,  # its own process group: stop() ends the whole tree
            )
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def sample(self) -> int:
        if self.alive():
            self.peak_kb = max(self.peak_kb, tree_kb(self.pid, "VmHWM"))
        return self.peak_kb

    def rss_kb(self) -> int:
        return tree_kb(self.pid, "VmRSS") if self.alive() else 0

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_ready(self, ready_s: float = 60.0, path: str | None = None) -> None:
        """Wait until the port accepts connections (and ``path`` answers over HTTP, if given)."""
        deadline = time.monotonic() + ready_s
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited ({self.popen and self.popen.returncode}):\n{self.tail()}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                if path is None:
                    writer.close()
                    return
                writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                if line.split(b" ")[1:2] and line.split(b" ")[1].startswith(b"2"):
                    return
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready on port {self.port} after {ready_s:.0f}s:\n{self.tail()}")
            await asyncio.sleep(0.1)

    def terminate(self) -> None:
        """Ask the process (group) to stop; ``stop`` then waits for it."""
        if self.popen is None:
            return
        self.sample()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.popen is None:
            return
        self.terminate()
        if self.popen.poll() is None:
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=10)
        # forked children that outlived their parent (same process group)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)


def stop_all(procs: list[Proc | None]) -> None:
    """SIGTERM every process first, then wait for each: they drain in parallel."""
    live = [p for p in procs if p is not None]
    for p in live:
        p.terminate()
    for p in live:
        p.stop()
