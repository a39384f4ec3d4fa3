"""The two upstreams and the contenders in front of them, each as a process on loopback."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import agentpay
from bench.install import Tools
from bench.loadgen import Target, tool_call_body
from bench.procs import BENCH, PY, Proc, free_port

LITELLM_MASTER_KEY = "sk-bench-master-key"
LITELLM_SERVER = "bench"


@dataclass
class Upstream:
    kind: str  # "aiohttp" | "fastmcp"
    label: str
    proc: Proc
    json_path: str = "/mcp"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}{self.json_path}"

    @property
    def sse_url(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}/mcp-sse"


def aiohttp_upstream(workdir: Path) -> Upstream:
    port = free_port()
    proc = Proc("upstream-aiohttp", [PY, "-m", "bench.upstream", "--port", str(port)], port, workdir / "upstream.log")
    return Upstream("aiohttp", "minimal aiohttp upstream", proc)


def fastmcp_upstream(workdir: Path, tools: Tools) -> Upstream:
    port = free_port()
    argv = [str(tools.fastmcp_python), str(BENCH / "fastmcp_upstream.py"), str(port)]
    proc = Proc("upstream-fastmcp", argv, port, workdir / "upstream.log")
    return Upstream("fastmcp", "FastMCP upstream (stateless, JSON)", proc)


@dataclass
class Contender:
    key: str
    label: str
    note: str = ""
    proc: Proc | None = None  # None: measured on the upstream itself (direct)
    target: Target | None = None
    gateway: agentpay.Gateway | None = None
    unavailable: str | None = None
    ready_path: str | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)
    peak_kb: int = 0


ORDER = [
    "direct",
    "nginx",
    "reference",
    "fastmcp_proxy",
    "litellm",
    "agentpay_free",
    "agentpay_sqlite",
    "agentpay_pg",
    "agentpay_sqlite_w2",
    "agentpay_pg_w2",
]
LABELS = {
    "direct": "direct (no proxy)",
    "nginx": "nginx (keepalive upstream)",
    "reference": "reference pass-through (plain aiohttp)",
    "fastmcp_proxy": "FastMCP proxy (create_proxy)",
    "litellm": "LiteLLM MCP gateway (no DB)",
    "agentpay_free": "AgentPay free call",
    "agentpay_sqlite": "AgentPay paid call, SQLite",
    "agentpay_pg": "AgentPay paid call, PostgreSQL",
    "agentpay_sqlite_w2": "AgentPay paid call, SQLite, 2 workers",
    "agentpay_pg_w2": "AgentPay paid call, PostgreSQL, 2 workers",
    "agentpay_sqlite_grants": "AgentPay paid call, SQLite, credit grants",
    "agentpay_pg_grants": "AgentPay paid call, PostgreSQL, credit grants",
}


def body_for(tool: str) -> bytes:
    return tool_call_body(tool)


def direct(up: Upstream) -> Contender:
    return Contender("direct", LABELS["direct"], target=Target(up.url, {}, body_for("get_forecast")))


def nginx(up: Upstream, workdir: Path, tools: Tools) -> Contender:
    c = Contender("nginx", LABELS["nginx"], note="1 worker, keepalive 64, proxy_buffering off")
    if tools.nginx:
        c.unavailable = tools.nginx
        return c
    port = free_port()
    d = workdir / "nginx"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  upstream up {{ server 127.0.0.1:{up.proc.port}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 3600s;
    }}
  }}
}}
"""
    )
    c.proc = Proc("nginx", ["nginx", "-p", str(d), "-c", str(conf)], port, d / "stdout.log")
    c.target = Target(f"http://127.0.0.1:{port}{up.json_path}", {}, body_for("get_forecast"))
    return c


def reference(up: Upstream, workdir: Path, *, sse: bool = False) -> Contender:
    port = free_port()
    url = up.sse_url if sse else up.url
    c = Contender("reference", LABELS["reference"], note="no auth/pricing/ledger, bytes forwarded, default loop")
    c.proc = Proc(
        "reference", [PY, "-m", "bench.reference", "--port", str(port), "--upstream", url], port, workdir / "ref.log"
    )
    c.target = Target(f"http://127.0.0.1:{port}/mcp", {}, body_for("get_forecast"))
    return c


def fastmcp_proxy(up: Upstream, workdir: Path, tools: Tools) -> Contender:
    c = Contender("fastmcp_proxy", LABELS["fastmcp_proxy"], note="fastmcp 4.x, stateless JSON")
    if tools.fastmcp:
        c.unavailable = tools.fastmcp
        return c
    port = free_port()
    argv = [str(tools.fastmcp_python), str(BENCH / "fastmcp_proxy.py"), up.url, str(port)]
    c.proc = Proc("fastmcp-proxy", argv, port, workdir / "fastmcp_proxy.log")
    c.target = Target(f"http://127.0.0.1:{port}/mcp", {}, body_for("get_forecast"))
    return c


def litellm(up: Upstream, workdir: Path, tools: Tools) -> Contender:
    c = Contender(
        "litellm",
        LABELS["litellm"],
        note="litellm[proxy], master key, default_cost_per_query; no database (its Prisma engine "
        "is downloaded from outside the registries), so no spend is persisted",
    )
    if tools.litellm:
        c.unavailable = tools.litellm
        return c
    port = free_port()
    d = workdir / "litellm"
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "model_list": [],
        "mcp_servers": {
            LITELLM_SERVER: {
                "url": up.url,
                "transport": "http",
                "mcp_info": {"mcp_server_cost_info": {"default_cost_per_query": 0.01}},
            }
        },
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
        "litellm_settings": {"telemetry": False},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        str(tools.litellm_bin),
        "--config",
        str(d / "config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "DISABLE_SCHEMA_UPDATE": "True"}
    c.proc = Proc("litellm", argv, port, d / "litellm.log", env=env, cwd=d)
    c.ready_path = "/health/liveliness"
    c.target = Target(
        f"http://127.0.0.1:{port}/mcp",
        {"x-litellm-api-key": f"Bearer {LITELLM_MASTER_KEY}"},
        body_for(f"{LITELLM_SERVER}-get_forecast"),
    )
    return c


def agentpay_gateway(
    key: str, up: Upstream, workdir: Path, *, database: str, paid: bool, sse: bool = False, workers: int = 1
) -> Contender:
    notes = {
        "agentpay_free": "price 0: key checked, nothing held",
        "agentpay_sqlite": "1¢ per call: hold + capture, SQLite WAL; every capture fsynced before it counts",
        "agentpay_pg": "1¢ per call: hold + capture, PostgreSQL (fresh database)",
        "agentpay_sqlite_w2": "as the SQLite paid call, `serve --workers 2` (SO_REUSEPORT), one ledger file",
        "agentpay_pg_w2": "as the PostgreSQL paid call, `serve --workers 2` (SO_REUSEPORT)",
        "agentpay_sqlite_grants": "as the SQLite paid call with `credit_grants: true`: held and captured in memory, "
        "written in batches every 10 ms (credit_grants_flush_ms)",
        "agentpay_pg_grants": "as the PostgreSQL paid call with `credit_grants: true`",
    }
    extra = {"credit_grants": True} if key.endswith("_grants") else {}
    gw = agentpay.Gateway(
        key, workdir / key, up.sse_url if sse else up.url, database, paid, workers=workers, extra=extra
    )
    c = Contender(key, LABELS[key], note=notes[key], gateway=gw)
    return c


def finish_agentpay(c: Contender) -> None:
    """After ``gateway.setup()``: the process and the request (with the key)."""
    gw = c.gateway
    assert gw is not None
    c.proc = gw.process()
    c.ready_path = "/readyz"
    c.target = Target(gw.url, {"Authorization": f"Bearer {gw.key}"}, body_for("get_forecast"))
