"""Routing like a real edge: by path and by Host, immune to path tricks; TLS termination."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import aiohttp
import pytest

from gateway.errors import BadRequest, UnknownServer
from gateway.proxy.routing import Router, redact_path, resolve
from tests.fault_upstream import run_fault_upstream
from tests.harness import FAULT_PRICES, prepare_ledger, run_gateway, tool_call, write_config
from tests.process import run_gateway_process

SERVERS = ("weather", "maps")
HOSTS = {"weather.example.com": "weather"}


def test_a_server_is_found_by_path_with_or_without_a_path_key() -> None:
    assert resolve("gw", "/weather/mcp", servers=SERVERS, hosts=HOSTS).server == "weather"
    route = resolve("gw", "/k/ap_secret/maps/mcp", servers=SERVERS, hosts=HOSTS)
    assert (route.server, route.path_key, route.endpoint) == ("maps", "ap_secret", "mcp")


def test_on_a_servers_own_host_only_that_servers_paths_exist() -> None:
    assert resolve("Weather.Example.com:443", "/mcp", servers=SERVERS, hosts=HOSTS).server == "weather"
    assert resolve("weather.example.com", "/k/ap_x/mcp", servers=SERVERS, hosts=HOSTS).path_key == "ap_x"
    with pytest.raises(UnknownServer):
        resolve("weather.example.com", "/maps/mcp", servers=SERVERS, hosts=HOSTS)


@pytest.mark.parametrize(
    "path",
    [
        "/weather/../maps/mcp",
        "/weather%2F..%2Fmaps/mcp",
        "/weather/%2e%2e/maps/mcp",
        "/maps%2fmcp",
        "/weather\\..\\maps/mcp",
    ],
)
def test_path_tricks_never_reach_another_server(path: str) -> None:
    with pytest.raises((BadRequest, UnknownServer)):
        resolve("gw", path, servers=SERVERS, hosts=HOSTS)


def test_path_embedded_keys_are_redacted_for_logs() -> None:
    assert redact_path("/k/ap_secret/weather/mcp") == "/k/<redacted>/weather/mcp"
    assert redact_path("/weather/mcp") == "/weather/mcp"


async def test_a_key_for_one_server_cannot_reach_another_through_the_host_header(tmp_path: Path) -> None:
    async with run_fault_upstream() as (url, upstream):
        config = write_config(
            tmp_path,
            {"weather": url, "maps": url},
            FAULT_PRICES,
            server_options={"maps": {"hosts": ["maps.example.com"]}},
        )
        async with run_gateway(config) as gw:
            key = await gw.new_user("alice", "100", server="weather")
            async with aiohttp.ClientSession() as http:
                headers = {
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json",
                    "Accept": "application/json",
                }
                async with http.post(
                    gw.server.make_url("/mcp"),
                    data=json.dumps(tool_call("get_forecast")),
                    headers={**headers, "Host": "maps.example.com"},
                ) as resp:
                    assert resp.status == 403
                    assert (await resp.json())["error"]["data"]["code"] == "wrong_server"
                async with http.post(
                    gw.server.make_url("/mcp"),
                    data=json.dumps(tool_call("get_forecast")),
                    headers={**headers, "Host": "nowhere.example"},
                ) as resp:
                    assert resp.status == 404
            assert upstream.completed == []


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (cert.pem, key.pem in tmp_path)."""
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    files = ["-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")]
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject, *files]
    subprocess.run(cmd, check=True, capture_output=True)
    return tmp_path / "cert.pem"


async def test_tls_is_terminated_when_a_certificate_is_configured(tmp_path: Path, certificate: Path) -> None:
    async with run_fault_upstream() as (url, _):
        config = write_config(tmp_path, {"weather": url}, FAULT_PRICES, tls_cert="cert.pem", tls_key="key.pem")
        await prepare_ledger(config)
        async with run_gateway_process(config, scheme="https") as gw:
            ctx = ssl.create_default_context(cafile=str(certificate))
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"https://127.0.0.1:{gw.port}/healthz", ssl=ctx) as resp,
            ):
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientError):
                async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{gw.port}/healthz"):
                    pass


def test_the_router_remembers_plain_routes_only() -> None:
    router = Router(SERVERS, HOSTS, max_routes=2)
    first = router.resolve("gw", "/weather/mcp")
    assert router.resolve("gw", "/weather/mcp") is first
    assert router.resolve("gw", "/k/ap_secret/maps/mcp").path_key == "ap_secret"
    assert all("ap_secret" not in path for _, path in router._routes)  # a path with a key is never kept
    assert router.resolve("weather.example.com", "/mcp").server == "weather"  # host routing still applies
    router.resolve("gw", "/maps/sse")
    assert len(router._routes) <= 2
    with pytest.raises(UnknownServer):
        router.resolve("gw", "/nope/mcp")
