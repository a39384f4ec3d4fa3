"""Static checks of the deployment material in deploy/ (no Docker engine or cluster needed).

Every YAML file parses; every gateway config under deploy/ loads with the real config loader and its
price table with the real price loader; the commands in the Dockerfile, docker-compose.yml, the
Kubernetes manifests and the systemd unit parse with the real CLI parser; ports, probes, mounts,
grace periods, users and selectors agree with each other and with the configs they run.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway import config as gateway_config
from gateway.api.admin import create_admin_app
from gateway.api.operations import Operations
from gateway.app import create_app
from gateway.billing.pricing import load_prices
from gateway.config import ADMIN_TOKEN_ENV, GatewayConfig, load_config, parse_listen
from gateway.errors import ConfigError
from gateway.ops.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ETC = PurePosixPath("/etc/agentpay")
# Optional in gateway.config while multi-replica sessions land; checked wherever it exists.
SESSION_SECRET_ENV: str | None = getattr(gateway_config, "SESSION_SECRET_ENV", None)
# Values for ${NAME} references when loading configs (a real, parseable value for each).
FAKE_ENV = {
    "AGENTPAY_DATABASE_URL": "postgresql://agentpay:secret@postgres.example.internal:5432/agentpay",
    "AGENTPAY_ADMIN_TOKEN": "test-admin-token",
    "AGENTPAY_SESSION_SECRET": "test-session-secret",
}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in sorted(K8S.glob("*.yaml")) for doc in load_docs(path) if "kind" in doc]


def k8s_object(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [doc for _, doc in k8s_objects() if doc["kind"] == kind and name in (None, doc["metadata"]["name"])]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''} in deploy/k8s, found {len(found)}"
    return found[0]


def parse_cli(argv: list[str]) -> Any:
    """Parse like the real `agentpay` (argparse exits with 2 on anything it does not know)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # pragma: no cover - only on a broken deploy file
        raise AssertionError(f"agentpay does not accept {argv!r} (exit {exc.code})") from None


def env_refs(text: str) -> set[str]:
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))


def load_gateway_config(path: Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load with every referenced ${NAME} set, and check the price table beside it loads too."""
    used = env if env is not None else {name: FAKE_ENV.get(name, "x") for name in env_refs(path.read_text())}
    config = load_config(path, env=used)
    table = load_prices(config.prices_path, config.servers.keys())
    assert table.digest
    return config


def seconds(value: Any) -> float:
    """Compose durations ("30s", "1m30s") or plain numbers."""
    if isinstance(value, int | float) or re.fullmatch(r"\d+(\.\d+)?", str(value)):
        return float(value)
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(value))
    assert parts and "".join(a + b for a, b in parts) == str(value), f"not a duration: {value!r}"
    for number, unit in parts:
        total += float(number) * units[unit]
    return total


def compose_interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Docker Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ (a literal $)."""
    if isinstance(value, dict):
        return {k: compose_interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [compose_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {arg}")
        return ""

    pattern = r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}"
    return re.sub(pattern, substitute, value)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DEPLOY / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "the Dockerfile ends with a line continuation"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [i for i, (ins, _) in enumerate(instructions) if ins == "FROM"]
    return instructions[starts[-1] :]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"not exec form: {args}"
    return value


def instruction(name: str) -> str:
    found = [args for ins, args in final_stage() if ins == name]
    assert found, f"the final stage has no {name}"
    return found[-1]


def image_user() -> tuple[int, int]:
    user = instruction("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit(), f"USER should be numeric so runAsNonRoot can check it, got {user!r}"
    return int(uid), int(gid or uid)


def systemd_unit() -> dict[str, list[tuple[str, str]]]:
    """Sections of deploy/systemd/agentpay.service as lists of (key, value); keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in (DEPLOY / "systemd" / "agentpay.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(section: str, key: str) -> str:
    values = [v for k, v in systemd_unit()[section] if k == key]
    assert values, f"[{section}] has no {key}="
    return values[-1]


def config_from_configmap(tmp_path: Path) -> GatewayConfig:
    """The ConfigMap's files written out as the kubelet does, then loaded like a pod loads them."""
    data = k8s_object("ConfigMap", "agentpay-config")["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return load_gateway_config(tmp_path / "gateway.yaml")


def pod_spec(kind: str = "Deployment", name: str = "agentpay") -> dict[str, Any]:
    spec: dict[str, Any] = k8s_object(kind, name)["spec"]["template"]["spec"]
    return spec


def gateway_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def probe_port(container: dict[str, Any], probe: dict[str, Any]) -> int:
    port = probe["httpGet"]["port"]
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in by_name, f"probe port {port!r} is not a named container port"
    return int(by_name[port])


def app_paths(config: GatewayConfig) -> set[str]:
    app = create_app(config)
    return {resource.canonical for resource in app.router.resources()}


def admin_app_paths(config: GatewayConfig) -> set[str]:
    def no_operations() -> Operations:
        raise AssertionError("listing the admin API's routes runs none of them")

    app = create_admin_app(no_operations, config.admin_token)
    return {resource.canonical for resource in app.router.resources()}


# ------------------------------------------------------------------------------------------------
# every file
# ------------------------------------------------------------------------------------------------
def test_deploy_has_the_expected_files() -> None:
    expected = [
        "Dockerfile",
        "Dockerfile.dockerignore",
        "README.md",
        "docker-compose.yml",
        "prometheus.yml",
        "compose/gateway.yaml",
        "compose/prices.yaml",
        "compose/nginx.conf",
        "docker/gateway.yaml",
        "docker/prices.yaml",
        "k8s/kustomization.yaml",
        "k8s/deployment.yaml",
        "k8s/service.yaml",
        "k8s/configmap.yaml",
        "k8s/secret.example.yaml",
        "k8s/pdb.yaml",
        "k8s/networkpolicy.yaml",
        "systemd/agentpay.service",
        "systemd/gateway.yaml",
        "systemd/prices.yaml",
    ]
    missing = [name for name in expected if not (DEPLOY / name).is_file()]
    assert not missing


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} has no YAML document"
    assert all(isinstance(doc, dict) for doc in docs)


def gateway_config_files() -> list[Path]:
    return sorted(DEPLOY.rglob("gateway.yaml"))


@pytest.mark.parametrize("path", gateway_config_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_gateway_config_loads(path: Path) -> None:
    config = load_gateway_config(path)
    # In a container or behind a load balancer the gateway must not listen on loopback only.
    if path.parent.name in ("compose", "docker"):
        assert config.listen_host == "0.0.0.0"
        assert config.admin_listen is not None and parse_listen(config.admin_listen)[1] == 8081
    assert config.listen_port == 8080
    assert config.servers
    assert config.log_format == "json"


def test_config_env_references_are_really_expanded(tmp_path: Path) -> None:
    config = load_gateway_config(DEPLOY / "compose" / "gateway.yaml")
    assert config.database == FAKE_ENV["AGENTPAY_DATABASE_URL"]
    assert config.admin_token == FAKE_ENV["AGENTPAY_ADMIN_TOKEN"]
    with pytest.raises(ConfigError, match="AGENTPAY_DATABASE_URL"):
        load_config(DEPLOY / "compose" / "gateway.yaml", env={"AGENTPAY_ADMIN_TOKEN": "x"})


# ------------------------------------------------------------------------------------------------
# Dockerfile
# ------------------------------------------------------------------------------------------------
def test_dockerfile_base_image_is_python_311_slim() -> None:
    instructions = dockerfile_instructions()
    args = dict(a.split("=", 1) for ins, a in instructions if ins == "ARG" and "=" in a)
    base = instruction("FROM").split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base


def test_dockerfile_installs_the_package_from_the_repo_root_context() -> None:
    runs = " ".join(a for ins, a in dockerfile_instructions() if ins == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the package is not installed with pip install ."
    copies = [a.split() for ins, a in dockerfile_instructions() if ins == "COPY" and "--from" not in a]
    sources = [src for parts in copies for src in parts[:-1]]
    assert "pyproject.toml" in sources and "gateway" in sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the build context (the repository root)"
    # The ignore file must not exclude what COPY needs (BuildKit reads <Dockerfile>.dockerignore).
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in sources:
        if "*" in ignore:
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"


def test_dockerfile_entrypoint_is_the_console_script_and_cmd_parses() -> None:
    entrypoint = exec_form(instruction("ENTRYPOINT"))
    assert entrypoint == ["agentpay"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["agentpay"] == "gateway.ops.cli:main"
    cmd = exec_form(instruction("CMD"))
    args = parse_cli(cmd)
    assert args.command == "serve"
    assert PurePosixPath(args.config) == ETC / "gateway.yaml"


def test_dockerfile_runs_as_non_root_and_exposes_the_config_ports() -> None:
    uid, gid = image_user()
    assert uid != 0 and gid != 0
    runs = " ".join(a for ins, a in dockerfile_instructions() if ins == "RUN")
    assert f"--uid {uid}" in runs, "USER does not match the user the image creates"
    exposed = {int(p.split("/")[0]) for p in instruction("EXPOSE").split()}
    assert exposed == {8080, 8081}
    assert instruction("STOPSIGNAL") == "SIGTERM"


def healthcheck_command() -> list[str]:
    args = instruction("HEALTHCHECK")
    _, _, cmd = args.partition("CMD ")
    argv = exec_form(cmd)
    assert argv[:2] == ["python", "-c"], "the slim image has no curl: use python -c"
    return argv


def test_dockerfile_healthcheck_hits_healthz_on_the_listen_port() -> None:
    code = healthcheck_command()[2]
    compile(code, "<HEALTHCHECK>", "exec")
    url = re.search(r"http://[^'\"]+", code)
    assert url is not None
    assert url.group(0) == "http://127.0.0.1:8080/healthz"
    config = load_gateway_config(DEPLOY / "docker" / "gateway.yaml")
    assert config.listen_port == 8080
    assert "/healthz" in app_paths(config)


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _run_healthcheck(port: int) -> int:
    code = healthcheck_command()[2].replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_dockerfile_healthcheck_exit_status(health_server: ThreadingHTTPServer) -> None:
    port = health_server.server_address[1]
    _Health.status = 200
    assert _run_healthcheck(port) == 0
    _Health.status = 503
    try:
        assert _run_healthcheck(port) != 0
    finally:
        _Health.status = 200
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(port) != 0  # nothing listening


# ------------------------------------------------------------------------------------------------
# docker compose
# ------------------------------------------------------------------------------------------------
COMPOSE_ENV = {"AGENTPAY_ADMIN_TOKEN": "t" * 32, "AGENTPAY_SESSION_SECRET": "s" * 32}


def compose() -> dict[str, Any]:
    (doc,) = load_docs(DEPLOY / "docker-compose.yml")
    result: dict[str, Any] = compose_interpolate(doc, COMPOSE_ENV)
    return result


def compose_mount(service: dict[str, Any], target: PurePosixPath) -> Path:
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if PurePosixPath(rest.split(":")[0]) == target:
            return (DEPLOY / str(source)).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def compose_gateway_config() -> tuple[dict[str, Any], GatewayConfig]:
    gateway = compose()["services"]["gateway"]
    args = parse_cli(gateway["command"])
    assert args.command == "serve"
    config_path = PurePosixPath(args.config)
    host_dir = compose_mount(gateway, config_path.parent)
    env = {k: str(v) for k, v in gateway["environment"].items()}
    return gateway, load_gateway_config(host_dir / config_path.name, env)


def test_compose_needs_the_admin_token() -> None:
    (doc,) = load_docs(DEPLOY / "docker-compose.yml")
    with pytest.raises(AssertionError, match="AGENTPAY_ADMIN_TOKEN"):
        compose_interpolate(doc, {})


def test_compose_runs_two_gateways_on_a_shared_postgres_ledger() -> None:
    services = compose()["services"]
    assert {"postgres", "gateway", "prometheus"} <= set(services)
    gateway, config = compose_gateway_config()
    assert gateway["deploy"]["replicas"] >= 2
    assert config.database.startswith("postgresql://")
    url = re.match(r"postgresql://(?P<user>[^:]+):(?P<pw>[^@]+)@(?P<host>[^:/]+):5432/(?P<db>\w+)$", config.database)
    assert url is not None, config.database
    pg = services["postgres"]["environment"]
    assert url["host"] == "postgres"
    assert (url["user"], url["pw"], url["db"]) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert config.admin_token == COMPOSE_ENV["AGENTPAY_ADMIN_TOKEN"]
    if SESSION_SECRET_ENV:
        assert gateway["environment"].get(SESSION_SECRET_ENV), "replicas need one shared session secret"


def test_compose_gateway_image_build_and_ports() -> None:
    gateway, config = compose_gateway_config()
    build = gateway["build"]
    assert (DEPLOY / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert {str(config.listen_port), "8081"} <= {str(p) for p in gateway["expose"]}
    assert config.admin_listen is not None and str(parse_listen(config.admin_listen)[1]) in gateway["expose"]
    assert seconds(gateway["stop_grace_period"]) > config.drain_grace_s
    assert gateway.get("stop_signal", "SIGTERM") == "SIGTERM"


def test_compose_owners_are_bootstrapped_before_the_gateways_start() -> None:
    services = compose()["services"]
    gateway, config = compose_gateway_config()
    assert gateway["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
    script = " ".join(services["bootstrap"]["command"])
    for server in config.servers.values():
        assert f"developers create {server.owner}" in script
    # what the shell script runs is a real CLI command
    command = re.search(r"\$\((agentpay [^)]*?)( 2>&1)?\)", script)
    assert command is not None, script
    argv = shlex.split(command.group(1))
    assert parse_cli(argv[1:]).action == "create"
    # every upstream is a service on the compose network
    for server in config.servers.values():
        assert server.upstream is not None
        host = urlsplit(server.upstream).hostname
        assert host in services, f"upstream host {host} is not a compose service"


def test_compose_trusts_exactly_the_load_balancer() -> None:
    doc = compose()
    _, config = compose_gateway_config()
    nginx = doc["services"]["nginx"]
    address = nginx["networks"]["agentpay"]["ipv4_address"]
    subnet = ipaddress.ip_network(doc["networks"]["agentpay"]["ipam"]["config"][0]["subnet"])
    assert ipaddress.ip_address(address) in subnet
    assert config.trusted_proxies == (address,)
    conf = compose_mount(nginx, PurePosixPath("/etc/nginx/conf.d/default.conf"))
    assert conf == DEPLOY / "compose" / "nginx.conf"


def test_nginx_streams_sse_unbuffered_to_the_gateways() -> None:
    _, config = compose_gateway_config()
    conf = (DEPLOY / "compose" / "nginx.conf").read_text()
    directives = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(proxy_\w+)\s+([^;]+);", conf, re.M)}
    assert directives["proxy_buffering"] == "off"
    assert directives["proxy_http_version"] == "1.1"
    assert seconds(directives["proxy_read_timeout"]) >= config.stream_idle_timeout_s
    assert re.search(rf"^\s*server\s+gateway:{config.listen_port}\b", conf, re.M)
    body = re.search(r"client_max_body_size\s+(\d+)m;", conf)
    assert body is not None and int(body.group(1)) * 1024 * 1024 >= config.max_body_bytes


def test_prometheus_scrapes_every_gateway_replica_on_its_admin_listener_with_the_admin_token() -> None:
    services = compose()["services"]
    _, config = compose_gateway_config()
    prometheus = services["prometheus"]
    assert compose_mount(prometheus, PurePosixPath("/etc/prometheus/prometheus.yml")) == DEPLOY / "prometheus.yml"
    (prom,) = load_docs(DEPLOY / "prometheus.yml")
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "agentpay"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["gateway"] and sd["type"] == "A"
    # /metrics (revenue per server) is served only on the admin listener, behind the admin token
    assert config.admin_listen is not None and sd["port"] == parse_listen(config.admin_listen)[1]
    assert "/metrics" in admin_app_paths(config) and "/metrics" not in app_paths(config)
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    token_file = PurePosixPath(job["authorization"]["credentials_file"])
    assert token_file.parent == PurePosixPath("/run/secrets") and token_file.name in prometheus["secrets"]
    assert compose()["secrets"][token_file.name] == {"environment": ADMIN_TOKEN_ENV}


def test_k8s_pods_are_not_scraped_by_annotation_on_the_public_port() -> None:
    """/metrics is on the admin port only, behind the token, which prometheus.io/* annotations cannot give."""
    annotations = k8s_object("Deployment", "agentpay")["spec"]["template"]["metadata"].get("annotations", {})
    assert not any(name.startswith("prometheus.io/") for name in annotations)


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------
REQUIRED_SPEC = {
    "Deployment": ["replicas", "selector", "template"],
    "Service": ["selector", "ports"],
    "PodDisruptionBudget": ["selector"],
    "NetworkPolicy": ["podSelector"],
    "Ingress": ["rules"],
    "Job": ["template"],
}
API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "Secret": "v1",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "Ingress": "networking.k8s.io/v1",
    "Job": "batch/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_k8s_objects_have_api_version_kind_and_required_fields(path: Path) -> None:
    for doc in load_docs(path):
        kind = doc["kind"]
        assert doc["apiVersion"] == API_VERSIONS[kind], f"{path.name}: {kind} apiVersion"
        if kind == "Kustomization":
            continue
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        for field in REQUIRED_SPEC.get(kind, []):
            assert field in doc["spec"], f"{path.name}: {kind}.spec.{field} is missing"
        if kind == "ConfigMap":
            assert doc["data"]
        if kind == "Secret":
            assert doc.get("stringData") or doc.get("data")


def test_k8s_objects_validate_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    for path, doc in k8s_objects():
        if doc["kind"] == "Kustomization":
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:  # pragma: no cover - only on a broken file
            raise AssertionError(f"{path.name}: {doc['kind']}: {exc.message}") from None


def test_kustomization_lists_the_manifests_but_not_the_examples() -> None:
    kustomization = load_docs(K8S / "kustomization.yaml")[0]
    resources = kustomization["resources"]
    for name in resources:
        assert (K8S / name).is_file(), name
    kinds = {doc["kind"] for name in resources for doc in load_docs(K8S / name)}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert "Secret" not in kinds, "applying the kustomization must not overwrite the real Secret"
    assert not any("example" in name for name in resources)
    images = {image["name"] for image in kustomization["images"]}
    assert gateway_container()["image"].split(":")[0] in images


def test_kubectl_kustomize_builds_the_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    built = {(doc["kind"], doc["metadata"]["name"]) for doc in yaml.safe_load_all(result.stdout) if doc}
    assert ("Deployment", "agentpay") in built and ("ConfigMap", "agentpay-config") in built


def test_k8s_deployment_runs_the_serve_command_with_the_configmap_config(tmp_path: Path) -> None:
    deployment = k8s_object("Deployment", "agentpay")
    assert deployment["spec"]["replicas"] == 3
    container = gateway_container()
    assert "command" not in container, "keep the image's ENTRYPOINT (agentpay)"
    args = parse_cli(container["args"])
    assert args.command == "serve"
    config_path = PurePosixPath(args.config)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec()["volumes"]}
    (config_mount,) = [m for m in mounts.values() if "configMap" in volumes[m["name"]]]
    assert PurePosixPath(config_mount["mountPath"]) == config_path.parent
    assert volumes[config_mount["name"]]["configMap"]["name"] == "agentpay-config"
    assert config_mount.get("readOnly") is True
    config = config_from_configmap(tmp_path)
    assert config.database == FAKE_ENV["AGENTPAY_DATABASE_URL"], "replicas need the shared PostgreSQL ledger"
    assert config.prices_path.parent == tmp_path, "prices.yaml must come from the same ConfigMap"


def test_k8s_configmap_is_never_mounted_with_subpath() -> None:
    for path, doc in k8s_objects():
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if not template:
            continue
        for container in template["containers"] + template.get("initContainers", []):
            for mount in container.get("volumeMounts", []):
                assert "subPath" not in mount and "subPathExpr" not in mount, f"{path.name}: subPath breaks hot reload"


def test_k8s_probes_point_at_healthz_and_readyz_on_the_listen_port(tmp_path: Path) -> None:
    config = config_from_configmap(tmp_path)
    container = gateway_container()
    readiness, liveness = container["readinessProbe"], container["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/readyz"
    assert liveness["httpGet"]["path"] == "/healthz"
    assert probe_port(container, readiness) == config.listen_port
    assert probe_port(container, liveness) == config.listen_port
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    paths = app_paths(config)
    assert {"/healthz", "/readyz"} <= paths
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == config.listen_port
    assert config.admin_listen is not None and ports["admin"] == parse_listen(config.admin_listen)[1]
    assert config.listen_host == "0.0.0.0"


def test_k8s_grace_period_covers_prestop_and_drain(tmp_path: Path) -> None:
    config = config_from_configmap(tmp_path)
    container = gateway_container()
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        delay = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] in ("sleep", "/bin/sleep"), command
        delay = float(command[1])
    assert delay >= 5, "give the endpoints controller time to remove the pod before the drain"
    grace = pod_spec()["terminationGracePeriodSeconds"]
    assert grace > config.drain_grace_s
    assert grace > delay + config.drain_grace_s


def test_k8s_secrets_come_from_the_secret_as_env(tmp_path: Path) -> None:
    container = gateway_container()
    env = {e["name"]: e for e in container["env"]}
    wanted = {ADMIN_TOKEN_ENV} | env_refs(k8s_object("ConfigMap", "agentpay-config")["data"]["gateway.yaml"])
    if SESSION_SECRET_ENV:
        wanted.add(SESSION_SECRET_ENV)
    secret = k8s_object("Secret", "agentpay")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for name in wanted:
        assert name in env, f"{name} is not set in the container"
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in keys, f"the Secret example has no key {ref['key']}"
    # the ConfigMap itself holds no secret
    assert "postgresql://" not in k8s_object("ConfigMap", "agentpay-config")["data"]["gateway.yaml"]


def test_k8s_pod_is_non_root_with_a_read_only_root_filesystem() -> None:
    uid, _ = image_user()
    spec = pod_spec()
    pod_ctx, ctx = spec["securityContext"], gateway_container()["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["runAsUser"] == uid != 0
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"]["drop"] == ["ALL"]
    resources = gateway_container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]


def test_k8s_selectors_match_the_pods() -> None:
    deployment = k8s_object("Deployment", "agentpay")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    container_ports = {p["name"] for p in gateway_container()["ports"]}
    for _, doc in k8s_objects():
        kind = doc["kind"]
        if kind == "Service":
            assert doc["spec"]["selector"].items() <= labels.items()
            for port in doc["spec"]["ports"]:
                assert port["targetPort"] in container_ports
        elif kind == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        elif kind == "NetworkPolicy":
            assert doc["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_k8s_pdb_keeps_two_pods() -> None:
    spec = k8s_object("PodDisruptionBudget")["spec"]
    replicas = k8s_object("Deployment", "agentpay")["spec"]["replicas"]
    assert spec.get("minAvailable") == 2 or spec.get("maxUnavailable") == 1
    assert spec.get("minAvailable", 0) < replicas


def test_k8s_admin_port_is_not_open_to_everyone() -> None:
    policy = k8s_object("NetworkPolicy")["spec"]
    assert "Ingress" in policy["policyTypes"]
    for rule in policy["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if not ports or "admin" in ports or 8081 in ports:
            assert rule.get("from"), "a rule admitting the admin port must say from whom"
    main = k8s_object("Service", "agentpay")
    assert all(p["targetPort"] != "admin" for p in main["spec"]["ports"])


def test_k8s_bootstrap_job_creates_every_owner(tmp_path: Path) -> None:
    config = config_from_configmap(tmp_path)
    job = k8s_object("Job", "agentpay-bootstrap")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    script = " ".join(container["args"])
    owners = re.search(r"for owner in ([^;]+);", script)
    assert owners is not None
    assert {s.owner for s in config.servers.values()} <= set(owners.group(1).split())
    commands = re.findall(r"agentpay (--config [^;)|&]*?)(?: 2>&1)?(?:\)|$)", script, re.M)
    assert len(commands) == 2, commands
    parsed = [parse_cli(shlex.split(command.replace("$owner", "acme"))) for command in commands]
    assert [(a.command, getattr(a, "action", None)) for a in parsed] == [
        ("developers", "create"),
        ("check-config", None),
    ]
    assert all(PurePosixPath(a.config) == ETC / "gateway.yaml" for a in parsed)


# ------------------------------------------------------------------------------------------------
# systemd
# ------------------------------------------------------------------------------------------------
def test_systemd_execstart_parses_and_runs_serve_as_agentpay() -> None:
    assert unit_value("Service", "Type") == "exec"
    assert unit_value("Service", "User") == "agentpay"
    argv = shlex.split(unit_value("Service", "ExecStart"))
    assert PurePosixPath(argv[0]).name == "agentpay"
    args = parse_cli(argv[1:])
    assert args.command == "serve"
    assert PurePosixPath(args.config) == ETC / "gateway.yaml"
    assert unit_value("Install", "WantedBy") == "multi-user.target"


def test_systemd_reload_and_stop_match_the_gateway() -> None:
    config = load_gateway_config(DEPLOY / "systemd" / "gateway.yaml")
    assert shlex.split(unit_value("Service", "ExecReload"))[-2:] == ["-HUP", "$MAINPID"]
    assert unit_value("Service", "KillSignal") == "SIGTERM"
    assert seconds(unit_value("Service", "TimeoutStopSec")) > config.drain_grace_s
    assert unit_value("Service", "Restart") == "on-failure"


def test_systemd_hardening_leaves_only_the_sqlite_directory_writable() -> None:
    config = load_gateway_config(DEPLOY / "systemd" / "gateway.yaml")
    assert unit_value("Service", "NoNewPrivileges") == "yes"
    assert unit_value("Service", "ProtectSystem") == "strict"
    assert unit_value("Service", "PrivateTmp") == "yes"
    assert config.database.startswith("sqlite:///")
    db_dir = PurePosixPath(config.database.removeprefix("sqlite:///")).parent
    writable = [PurePosixPath(p) for p in unit_value("Service", "ReadWritePaths").split()]
    assert db_dir in writable
    state = unit_value("Service", "StateDirectory")
    assert PurePosixPath("/var/lib") / state == db_dir
    assert config.admin_listen is not None and parse_listen(config.admin_listen)[0] == "127.0.0.1"


def test_systemd_environment_file_provides_the_admin_token() -> None:
    assert PurePosixPath(unit_value("Service", "EnvironmentFile").lstrip("-")) == ETC / "agentpay.env"
    example = (DEPLOY / "systemd" / "agentpay.env.example").read_text()
    assert re.search(rf"^{ADMIN_TOKEN_ENV}=\S+", example, re.M)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # The binary and the user do not exist here: point them at ones that do.
    text = (DEPLOY / "systemd" / "agentpay.service").read_text()
    text = text.replace("/opt/agentpay/bin/agentpay", "/bin/true").replace("=agentpay\n", "=root\n")
    unit = tmp_path / "agentpay.service"
    unit.write_text(text)
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if "agentpay.service" in line]
    assert result.returncode == 0 and not problems, result.stderr


# ------------------------------------------------------------------------------------------------
# README
# ------------------------------------------------------------------------------------------------
def test_readme_documents_the_commands_and_the_scale_out_story() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in [
        "docker build -f deploy/Dockerfile",
        "docker run",
        "docker compose -f deploy/docker-compose.yml up",
        "kubectl -n agentpay apply -k deploy/k8s",
        "systemctl enable --now agentpay",
        "systemctl reload agentpay",
        "proxy_buffering off",
        "trusted_proxies",
        "tls_cert",
        "Patroni",
        "hold_lease_s",
        "postings",
    ]:
        assert needle in text, needle
    for path in set(re.findall(r"deploy/[\w./-]+\w", text)):
        assert (ROOT / path).exists(), f"the README names {path}, which does not exist"
