"""``agentpay serve --workers N``: N gateway processes sharing the listening ports (SO_REUSEPORT).

One Python process runs one event loop on one core. With N workers the kernel spreads incoming
connections over N processes, each a complete gateway (its own ledger connections, billing owner
id, lease renewal and sweeper) exactly like the replicas of a multi-replica deployment, so nothing
new is shared between them: the ledger already serialises money across processes (SQLite's file
lock, PostgreSQL's row locks) and every replica-level guarantee (revocation within 1 s, price
reloads, stranded holds voided by the sweeper) holds between workers too. The exception is a stdio
server's session (``gateway.stdio``): its child process runs in one worker, which its session id
names; a request of that session the kernel hands to another worker is answered 404, so stdio servers
want one worker (or replicas behind a load balancer with affinity on ``Mcp-Session-Id``).

The supervisor (this module) only starts the workers, forwards SIGTERM/SIGINT to them so they
drain, and restarts a worker that dies without being asked to stop (its stranded holds are voided
by the others' sweepers when its leases lapse).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # a worker that keeps dying is restarted ever more slowly


@dataclass
class Supervisor:
    """Keeps ``count`` worker processes running ``argv`` until told to stop."""

    argv: Sequence[str]
    count: int
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    stopping: bool = False
    restarts: int = 0

    def start(self) -> None:
        self.procs = [self._spawn() for _ in range(self.count)]

    def _spawn(self) -> subprocess.Popen[bytes]:
        supervisor = os.getpid()
        return subprocess.Popen(list(self.argv), preexec_fn=lambda: _terminate_with_parent(supervisor))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(sig)

    def asked_to_stop(self) -> bool:
        return self.stopping

    def watch(self) -> int:
        """Until every worker has exited after ``stop``: restart workers that died on their own.
        Returns the first non-zero exit status of a stopped worker, else 0."""
        failures = 0
        while True:
            alive = [p for p in self.procs if p.poll() is None]
            if self.stopping and not alive:
                return next((p.returncode for p in self.procs if p.returncode not in (0, -signal.SIGTERM)), 0)
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and not self.stopping:
                    delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
                    print(
                        f"agentpay: worker {proc.pid} exited with {proc.returncode}; restarting it in {delay} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    time.sleep(delay)
                    if self.asked_to_stop():  # a signal may have come during the sleep
                        break
                    self.procs[i] = self._spawn()
                    self.restarts += 1
                    failures += 1
            try:
                os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)  # block until some child exits
            except ChildProcessError:
                continue  # no child left to wait for (all exited): the loop above sees it
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue


def _terminate_with_parent(supervisor: int) -> None:
    """In the forked worker, before exec (Linux): SIGTERM it when the supervisor dies, even by
    SIGKILL, so workers never outlive their supervisor. SIGTERM makes the worker drain as usual."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != supervisor:  # it died between fork and prctl
        os.kill(os.getpid(), signal.SIGTERM)


def worker_argv(config_path: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "--config", config_path, "serve", "--reuse-port"]


def run_workers(config_path: str, count: int) -> int:
    supervisor = Supervisor(worker_argv(config_path), count)

    def forward(signum: int, _frame: FrameType | None) -> None:
        supervisor.stop(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    supervisor.start()
    print(f"agentpay: supervising {count} workers: {[p.pid for p in supervisor.procs]}", file=sys.stderr, flush=True)
    return supervisor.watch()
