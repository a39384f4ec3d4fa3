"""One child process running a stdio MCP server: started with a clean environment (and optional
resource limits), its stdin written as JSON lines, its stdout read line by line (a line longer than
the limit is refused), its stderr sent to the log (tagged, size-limited) and stopped with SIGTERM,
then SIGKILL after a grace, its whole process group with it (``npx`` starts ``node`` underneath).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from gateway.config import StdioConfig

log = structlog.get_logger("gateway.stdio")

#: The variables a child gets from the gateway's own environment; everything else it gets is configured.
INHERITED_ENV = ("PATH", "HOME", "LANG")
STDERR_LINE_CHARS = 1000  # one logged stderr line at most
STDERR_BUDGET_BYTES = 64 * 1024  # logged per child; the rest is read and dropped
_LAUNCHER = Path(__file__).resolve().with_name("launcher.py")
_MIB = 1024 * 1024


class LineTooLong(Exception):
    """The child wrote a line longer than the limit."""


def child_env(config: StdioConfig, environ: Mapping[str, str]) -> dict[str, str]:
    """The child's whole environment: PATH, HOME and LANG from the gateway's, then the configured ones."""
    env = {name: environ[name] for name in INHERITED_ENV if name in environ}
    env.update(config.env)
    return env


def child_argv(config: StdioConfig) -> list[str]:
    """The command, behind the launcher when resource limits are configured."""
    limits = (
        config.rlimit_address_space_mb * _MIB if config.rlimit_address_space_mb is not None else None,
        config.rlimit_cpu_s,
        config.rlimit_open_files,
    )
    if all(limit is None for limit in limits):
        return list(config.command)
    texts = ["-" if limit is None else str(limit) for limit in limits]
    return [sys.executable, "-I", "-S", str(_LAUNCHER), *texts, "--", *config.command]


def command_problem(config: StdioConfig) -> str | None:
    """What would keep the command from starting (as far as can be told without starting it), or None."""
    if config.cwd is not None and not config.cwd.is_dir():
        return f"cwd {str(config.cwd)!r} is not a directory"
    program = config.command[0]
    path = child_env(config, os.environ).get("PATH", os.defpath)
    cwd = config.cwd or Path.cwd()
    if "/" in program:
        found = (cwd / program).is_file() and os.access(cwd / program, os.X_OK)
        return None if found else f"{program!r} is not an executable file"
    if shutil.which(program, path=path) is None:
        return f"{program!r} is not found on the PATH the child gets ({path})"
    return None


class Child:
    """A started stdio server process."""

    def __init__(self, proc: asyncio.subprocess.Process, server: str, *, max_line: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.server = server
        self.session_tag = "-"  # set when a session takes the child: its stderr lines say so
        self.started = time.monotonic()
        self._max_line = max_line
        self._stderr = asyncio.ensure_future(self._pump_stderr())
        self._stopping: asyncio.Future[None] | None = None

    @classmethod
    async def start(cls, server: str, config: StdioConfig, *, max_line: int) -> Child:
        """Start the server's command. OSError when it cannot be started (not found, not executable)."""
        proc = await asyncio.create_subprocess_exec(
            *child_argv(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(config, os.environ),
            cwd=config.cwd,
            start_new_session=True,  # its own process group: stopped as a whole, never sent our signals
            limit=max_line + 1,
        )
        log.info("stdio_started", server=server, pid=proc.pid)
        return cls(proc, server, max_line=max_line)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and self._stopping is None

    async def read_line(self) -> bytes | None:
        """The next line of stdout without its newline; None at the end of stdout.
        Raises LineTooLong for a line over the limit."""
        stdout = self.proc.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                return exc.partial.strip() or None  # a last line without its newline still counts
            except asyncio.LimitOverrunError:
                raise LineTooLong(f"a line of more than {self._max_line} bytes") from None
            if len(line) - 1 > self._max_line:
                raise LineTooLong(f"a line of more than {self._max_line} bytes")
            line = line.strip()
            if line:
                return line

    async def write(self, data: bytes) -> None:
        """Write to stdin. ConnectionError when the child closed it (it exited)."""
        stdin = self.proc.stdin
        assert stdin is not None
        if stdin.is_closing():
            raise ConnectionResetError("the child's stdin is closed")
        stdin.write(data)
        await stdin.drain()

    async def stop(self, grace_s: float, *, why: str) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace_s``; the exit status."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s, why))
        await asyncio.shield(self._stopping)
        return self.proc.returncode

    async def _stop(self, grace_s: float, why: str) -> None:
        if self.proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await self.proc.wait()
            except TimeoutError:
                log.warning("stdio_killed", server=self.server, pid=self.pid, grace_s=grace_s)
        self._signal(signal.SIGKILL)  # anything the server left behind in its group
        await self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._stderr
        log.info(
            "stdio_stopped",
            server=self.server,
            pid=self.pid,
            session=self.session_tag,
            why=why,
            exit=self.proc.returncode,
            ran_s=round(time.monotonic() - self.started, 3),
        )

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):  # the group is gone (PermissionError: macOS zombies)
            return

    async def _pump_stderr(self) -> None:
        """Log the child's stderr line by line, tagged, within a budget; read the rest and drop it."""
        stderr = self.proc.stderr
        assert stderr is not None
        budget = STDERR_BUDGET_BYTES
        pending = b""
        while True:
            chunk = await stderr.read(65536)
            if not chunk:
                break
            if budget <= 0:
                continue
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > STDERR_LINE_CHARS:
                lines.append(pending)
                pending = b""
            for raw in lines:
                text = raw.decode("utf-8", "replace").rstrip()[:STDERR_LINE_CHARS]
                if len(text) + 1 > budget:
                    budget = 0
                    log.warning("stdio_stderr_truncated", server=self.server, pid=self.pid, logged=STDERR_BUDGET_BYTES)
                    break
                budget -= len(text) + 1
                if text:
                    log.info("stdio_stderr", server=self.server, pid=self.pid, session=self.session_tag, line=text)
        text = pending.decode("utf-8", "replace").rstrip()[:STDERR_LINE_CHARS]
        if text and len(text) + 1 <= budget:
            log.info("stdio_stderr", server=self.server, pid=self.pid, session=self.session_tag, line=text)
