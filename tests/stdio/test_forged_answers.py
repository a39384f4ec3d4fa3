"""A stdio child that answers ids it was never sent (one of its own, and the previous call's again,
which in a shared stateless child is another key's) is charged exactly once per call it was asked,
and nobody receives another key's answer or a forged answer as a paid result."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.money import parse_cents
from tests.harness import run_gateway, tool_call, write_config
from tests.stdio.conftest import REPO
from tests.stdio.test_children import RawSession, modern_call, upstream_of

FORGER = [sys.executable, "-m", "tests.stdio.line_server", "--forge-on-call"]
PRICES: dict[str, Any] = {"weather": {"tools": {"pid": "5"}, "default": 0}}


def forging_config(tmp: Path, **options: Any) -> Path:
    server: dict[str, Any] = {"command": FORGER, "cwd": str(REPO), **options}
    return write_config(tmp, {"weather": None}, prices=PRICES, server_options={"weather": server})


def texts(body: Any) -> list[str]:
    messages = body if isinstance(body, list) else [body]
    return [m["result"]["content"][0]["text"] for m in messages if isinstance(m, dict) and "result" in m]


async def test_a_session_child_answering_ids_it_was_never_sent_is_charged_once_per_call(tmp_path: Path) -> None:
    async with run_gateway(forging_config(tmp_path, warm_processes=0)) as gw, aiohttp.ClientSession() as http:
        key = await gw.new_user("alice", "100")
        raw = RawSession(http, gw.url(), key)
        await raw.initialize()
        answers = [await raw.post(tool_call("pid", rid=n)) for n in (1, 2, 3)]
        for status, body in answers:
            assert status == 200 and texts(body) != ["forged"], body
        await gw.settled()
        assert await gw.balance("alice") == parse_cents("85")  # 3 calls at 5: the forged answers cost nothing

        # What the child sent unasked waits for the session's GET stream: nothing there is a paid result.
        seen: list[dict[str, Any]] = []
        async with http.get(gw.url(), headers=raw.headers()) as stream:
            assert stream.status == 200

            async def read() -> None:
                async for line in stream.content:
                    if line.startswith(b"data:"):
                        seen.append(json.loads(line[5:]))
                        if len(seen) == 5:  # "never-sent" x3, and calls 1 and 2 again
                            return

            await asyncio.wait_for(read(), timeout=10)
        forged = [m for m in seen if m["id"] == "never-sent"]
        replays = sorted((m["id"], m["error"]["data"]["code"]) for m in seen if m["id"] != "never-sent")
        assert len(forged) == 3 and all("_meta" not in m["result"] for m in forged)  # no receipt: not billed
        assert replays == [(1, "result_withheld"), (2, "result_withheld")]  # a second answer is never sold
        await gw.settled()
        assert await gw.balance("alice") == parse_cents("85")
        await gw.verify_clean()


async def test_a_shared_child_answering_another_keys_id_again_gives_it_to_nobody(tmp_path: Path) -> None:
    async with run_gateway(forging_config(tmp_path)) as gw, aiohttp.ClientSession() as http:
        alice, bob = await gw.new_user("alice", "100"), await gw.new_user("bob", "100")
        status, first = await RawSession(http, gw.url(), alice).post(modern_call("pid", {}, 1, "a"))
        assert status == 200
        status, second = await RawSession(http, gw.url(), bob).post(modern_call("pid", {}, 1, "b"))
        assert status == 200
        assert len(upstream_of(gw).shared) == 1  # one child served both keys
        # bob's child also answered alice's id (and one of its own): bob gets only his own answer
        for body in (first, second):
            assert texts(body) != [] and "forged" not in texts(body), body
        await gw.settled()
        assert (await gw.balance("alice"), await gw.balance("bob")) == (parse_cents("95"), parse_cents("95"))
        await gw.verify_clean()
