"""The npm side of the real-client tests: one pinned install of Node 22 and the MCP packages.

Everything goes into ``tests/clients/.npm/`` (gitignored). The install is done once and reused while
the pinned versions stay the same; a file lock keeps two processes (pytest and ``run.py``) from
installing at the same time. Nothing is fetched at run time other than from the npm registry.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".npm"

#: Exact versions the tests were written against. Node 22 is needed by the conformance suite and by
#: the inspector (>= 22.19); the machine's own Node may be older.
PACKAGES: dict[str, str] = {
    "node": "22.23.3",
    "@modelcontextprotocol/conformance": "0.1.16",
    "@modelcontextprotocol/inspector": "2.12.0",
    "@modelcontextprotocol/server-everything": "2026.8.31",
    "mcp-remote": "0.15.1",
}


class NpmUnavailable(RuntimeError):
    """npm (or the npm registry) could not provide the packages the tests need."""


@dataclass(frozen=True)
class NodeTools:
    root: Path

    @property
    def bin(self) -> Path:
        return self.root / "node_modules" / ".bin"

    @property
    def node(self) -> Path:
        return self.bin / "node"

    def package_dir(self, name: str) -> Path:
        return self.root / "node_modules" / name

    @property
    def everything_server(self) -> Path:
        return self.package_dir("@modelcontextprotocol/server-everything") / "dist" / "index.js"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for running the packages: our Node 22 first on PATH, no npm update nags."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("npm_")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["NO_UPDATE_NOTIFIER"] = "1"
        env["npm_config_update_notifier"] = "false"
        env["npm_config_fund"] = "false"
        env["npm_config_audit"] = "false"
        env.update(extra)
        return env

    def npx(self, package: str, *args: str) -> list[str]:
        """argv for `npx <package> ARGS` resolved against this install (never a download)."""
        npx = shutil.which("npx", path=str(self.bin) + os.pathsep + os.environ.get("PATH", ""))
        if npx is None:
            raise NpmUnavailable("npx is not on PATH; install Node.js and npm")
        return [npx, "--no", "--", package, *args]


def _installed_ok(root: Path) -> bool:
    stamp = root / "installed.json"
    if not stamp.exists():
        return False
    try:
        if json.loads(stamp.read_text()) != PACKAGES:
            return False
    except ValueError:
        return False
    node = root / "node_modules" / ".bin" / "node"
    return node.exists() and all((root / "node_modules" / name / "package.json").exists() for name in PACKAGES)


def ensure_installed(root: Path = CACHE) -> NodeTools:
    """Install (once) the pinned packages into ``root`` and return where they are."""
    root.mkdir(parents=True, exist_ok=True)
    tools = NodeTools(root)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _installed_ok(root):
            return tools
        npm = shutil.which("npm")
        if npm is None:
            raise NpmUnavailable("npm is not installed: the real-client tests need Node.js and npm")
        manifest = {"name": "agentpay-test-clients", "private": True, "dependencies": PACKAGES}
        (root / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (root / "installed.json").unlink(missing_ok=True)
        proc = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=root,
            env=tools.env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            raise NpmUnavailable(
                f"`npm install` of {', '.join(f'{k}@{v}' for k, v in PACKAGES.items())} into {root} failed "
                f"(exit {proc.returncode}); is the npm registry reachable?\n{proc.stderr[-3000:]}"
            )
        version = subprocess.run(
            [str(tools.node), "--version"], capture_output=True, text=True, check=False, timeout=60
        ).stdout.strip()
        if not version.startswith("v22."):
            raise NpmUnavailable(f"the npm package node@22 did not provide Node 22 (got {version!r}) in {root}")
        (root / "installed.json").write_text(json.dumps(PACKAGES))
        return tools
