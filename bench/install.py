"""Install what the benchmark needs, reporting what could not be installed instead of failing.

* wrk and nginx from Debian (``apt-get install -y wrk nginx-light``) when missing;
* fastmcp 4.x, litellm[proxy] and py-spy from PyPI, each into a virtualenv of its own under
  ``bench/.venvs/`` (made from this Python, so the same interpreter version). They are contenders
  running as separate processes; keeping them out of the project's venv keeps its test
  dependencies exactly as pyproject.toml says (litellm and fastmcp also pin different
  ``websockets`` versions, and litellm brings uvloop/orjson, which must not leak into AgentPay's
  or the reference's measurements).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.procs import BENCH

VENVS = BENCH / ".venvs"


@dataclass
class Tools:
    wrk: str | None = None  # reason when missing
    nginx: str | None = None
    fastmcp: str | None = None
    litellm: str | None = None
    pyspy: str | None = None

    @property
    def fastmcp_python(self) -> Path:
        return VENVS / "fastmcp" / "bin" / "python"

    @property
    def litellm_bin(self) -> Path:
        return VENVS / "litellm" / "bin" / "litellm"

    @property
    def pyspy_bin(self) -> Path:
        return VENVS / "tools" / "bin" / "py-spy"


def _log(msg: str) -> None:
    print(f"[install] {msg}", flush=True)


def _run(argv: list[str], log: Path, timeout: float = 1200) -> str | None:
    """Run a command, output to ``log``; None on success, else a one-line reason."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    try:
        with log.open("ab") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv[:3])}: {exc}"
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"{' '.join(argv[:4])} exited {proc.returncode}: {' | '.join(tail)}"
    return None


def _apt(packages: list[str], log: Path) -> str | None:
    if shutil.which("apt-get") is None:
        return "apt-get not found"
    if os.geteuid() != 0:
        return "not root: cannot apt-get install"
    reason = _run(["apt-get", "update", "-qq"], log, timeout=600)
    if reason is None:
        reason = _run(["apt-get", "install", "-y", "-qq", *packages], log)
    return reason


def _venv(name: str, requirements: list[str], probe: list[str], log: Path) -> str | None:
    """A virtualenv under bench/.venvs with ``requirements``; ``probe`` (run with its python) must pass."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), *probe], capture_output=True, check=False).returncode == 0:
        return None
    _log(f"creating {venv} with {' '.join(requirements)} (log: {log})")
    if not python.exists():
        reason = _run([sys.executable, "-m", "venv", str(venv)], log)
        if reason:
            return reason
    reason = _run([str(python), "-m", "pip", "install", "-q", *requirements], log)
    if reason:
        return reason
    if subprocess.run([str(python), *probe], capture_output=True, check=False).returncode != 0:
        return f"{name}: installed, but `{' '.join(probe)}` fails"
    return None


def _find(module: str) -> list[str]:
    return ["-c", f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"]


def ensure(log_dir: Path, *, want_litellm: bool = True, want_pyspy: bool = True) -> Tools:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # never fetch LiteLLM's cost map from outside
    tools = Tools()
    log = log_dir / "install.log"
    missing = [pkg for tool, pkg in (("wrk", "wrk"), ("nginx", "nginx-light")) if shutil.which(tool) is None]
    if missing:
        _log(f"apt-get install {' '.join(missing)}")
        reason = _apt(missing, log)
        if reason:
            _log(f"apt-get failed: {reason}")
    if shutil.which("wrk") is None:
        tools.wrk = "wrk not installed (apt-get failed); the Python load generator is used"
    if shutil.which("nginx") is None:
        tools.nginx = "nginx not installed (apt-get failed)"
    tools.fastmcp = _venv("fastmcp", ["fastmcp>=4,<5"], _find("fastmcp.server"), log)
    if want_litellm:
        tools.litellm = _venv("litellm", ["litellm[proxy]"], _find("litellm.proxy.proxy_server"), log)
    else:
        tools.litellm = "skipped"
    if want_pyspy:
        tools.pyspy = _venv("tools", ["py-spy"], ["-c", "import sys"], log)
        if tools.pyspy is None and not tools.pyspy_bin.exists():
            tools.pyspy = "py-spy binary missing after install"
    else:
        tools.pyspy = "skipped"
    for name in ("wrk", "nginx", "fastmcp", "litellm", "pyspy"):
        reason = getattr(tools, name)
        _log(f"{name}: {'ok' if reason is None else 'UNAVAILABLE - ' + reason}")
    return tools
