"""Hostile clients for the adversarial tests, and the money invariant they are checked against.

Every JSON-RPC message any client receives goes through one ``Observer``, which notes each priced
result (a result token, see ``upstreams``) that reached a client, who received it and the receipt it
carried. ``money_problems`` then checks, after the gateway has settled, that every priced result a
client received was charged exactly once, to its owner, that no client received another user's
result, and that ``ledger verify`` is clean.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from gateway.errors import NotFound
from tests.adversarial.upstreams import PATIENCE_S, PRICED_TOOLS, ResultLog, owner_of, tokens_in
from tests.harness import Gateway, rpc, run_gateway, write_config

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
RECEIPT = "io.agentpay/receipt"
WITHHELD = -32011
PRICE = "5"
PRICES: dict[str, Any] = {"weather": {"tools": dict.fromkeys(PRICED_TOOLS, PRICE), "default": 0}}
INIT_PARAMS = {"capabilities": {}, "clientInfo": {"name": "adversary", "version": "1"}}


def initialize(version: str = "2025-11-25", rid: Any = 0) -> dict[str, Any]:
    return rpc("initialize", {"protocolVersion": version, **INIT_PARAMS}, rid)


def call(name: str, rid: Any, *, task: bool = False, **arguments: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments}
    if task:
        params["task"] = {"ttl": 60000}
    return rpc("tools/call", params, rid)


def receipt_of(message: dict[str, Any]) -> dict[str, Any] | None:
    result = message.get("result")
    meta = result.get("_meta") if isinstance(result, dict) else None
    receipt = meta.get(RECEIPT) if isinstance(meta, dict) else None
    return receipt if isinstance(receipt, dict) else None


def is_success(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and "error" not in message
        and isinstance(message.get("result"), dict)
        and message["result"].get("isError") is not True
    )


def is_withheld(message: Any) -> bool:
    error = message.get("error") if isinstance(message, dict) else None
    if not isinstance(error, dict) or error.get("code") != WITHHELD:
        return False
    data = error.get("data")
    return isinstance(data, dict) and data.get("code") == "result_withheld"


def error_code(message: Any) -> tuple[int | None, str | None]:
    """(JSON-RPC error code, data.code) of an error message, (None, None) otherwise."""
    error = message.get("error") if isinstance(message, dict) else None
    if not isinstance(error, dict):
        return None, None
    data = error.get("data")
    return error.get("code"), data.get("code") if isinstance(data, dict) else None


@dataclass
class Delivery:
    user: str
    token: str
    charge_id: str | None
    rpc_id: Any
    via: str
    started: int  # tick at which the request (or stream) that carried it was sent (opened)
    received: int  # tick at which it arrived


@dataclass
class Observer:
    """Everything the clients received."""

    deliveries: list[Delivery] = field(default_factory=list)  # priced successes that reached a client
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (user, token, via): any token anywhere
    messages: list[tuple[str, Any]] = field(default_factory=list)
    ticks: int = 0

    def tick(self) -> int:
        self.ticks += 1
        return self.ticks

    def see(self, user: str, value: Any, via: str, started: int = 0) -> list[Any]:
        items = value if isinstance(value, list) else [value]
        received = self.tick()
        for item in items:
            self.messages.append((user, item))
            for token in tokens_in(item):
                self.seen.append((user, token, via))
                if is_success(item):
                    receipt = receipt_of(item)
                    charge = receipt.get("charge_id") if receipt else None
                    self.deliveries.append(Delivery(user, token, charge, item.get("id"), via, started, received))
        return items

    def tokens_received(self, user: str | None = None) -> set[str]:
        return {d.token for d in self.deliveries if user is None or d.user == user}


async def money_problems(
    gw: Gateway,
    observer: Observer,
    logs: Iterable[ResultLog],
    users: Iterable[str],
    *,
    exact: bool = True,
    first_paid: bool = True,
) -> list[str]:
    """What is wrong with the money, once every hold is settled. ``exact``: every charge of these
    users must be for a result one of them received (else: no more charges than priced results the
    upstreams produced for the user). ``first_paid``: a copy of a priced result without a receipt
    must not reach a client before the request that paid for it was sent."""
    problems: list[str] = []
    try:
        await gw.settled()
    except TimeoutError:
        problems.append(f"{gw.rt.billing.inflight} holds were never captured or voided (stranded)")
    problems.extend(f"ledger verify: {v}" for v in await gw.ledger.verify())
    minted: dict[str, str] = {}
    for log in logs:
        minted.update({token: owner_of(token) for token in log.minted})
    for user, token, via in observer.seen:
        if owner_of(token) != user:
            problems.append(f"{user} received {owner_of(token)}'s result {token} ({via})")
    by_token: defaultdict[str, list[Delivery]] = defaultdict(list)
    for delivery in observer.deliveries:
        by_token[delivery.token].append(delivery)
    charge_of: dict[str, str] = {}
    for token, deliveries in by_token.items():
        owner = owner_of(token)
        if token not in minted:
            problems.append(f"{token} reached a client but no upstream produced it")
        receipts = {d.charge_id for d in deliveries if d.charge_id is not None}
        if not receipts:
            vias = ", ".join(sorted({d.via for d in deliveries}))
            problems.append(f"priced result {token} reached {owner} {len(deliveries)}x uncharged ({vias})")
        elif first_paid:
            # A free copy is fine only once a request that paid for the result was under way: a copy
            # handed out before that is a free result whenever the owner does not come back for it.
            paying = min(d.started for d in deliveries if d.charge_id is not None)
            early = [d for d in deliveries if d.charge_id is None and d.received < paying]
            if early:
                problems.append(
                    f"priced result {token} reached {early[0].user} uncharged ({early[0].via}) "
                    "before any request paying for it was made"
                )
        if len(receipts) > 1:
            problems.append(f"priced result {token} was charged {len(receipts)} times: {sorted(receipts)}")
        for charge_id in receipts:
            if charge_id in charge_of:
                problems.append(f"receipt {charge_id} was given for two results: {charge_of[charge_id]}, {token}")
            charge_of[charge_id] = token
            try:
                charge = await gw.ledger.get_charge(charge_id)
            except NotFound:
                problems.append(f"{token} carried receipt {charge_id}, but no such charge exists (unbilled)")
                continue
            if charge.user != owner:
                problems.append(f"{owner}'s result {token} was charged to {charge.user}")
    for user in users:
        charges = await gw.ledger.list_charges(user=user, limit=100_000)
        if exact:
            stray = sorted({c.id for c in charges} - set(charge_of))
            if stray:
                problems.append(f"{user} was charged for results no client of theirs received: {stray}")
        produced = sum(1 for owner in minted.values() if owner == user)
        if len(charges) > produced:
            problems.append(f"{user} has {len(charges)} charges for {produced} priced results produced")
    return problems


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    messages: list[Any]
    raw: bytes

    @property
    def body(self) -> Any:
        """A JSON body as parsed (None for SSE or no body)."""
        try:
            return json.loads(self.raw) if self.raw.strip()[:1] in (b"{", b"[") else None
        except ValueError:
            return None

    def by_id(self, rid: Any) -> list[Any]:
        return [m for m in self.messages if isinstance(m, dict) and m.get("id") == rid and "method" not in m]


@dataclass
class Event:
    id: str | None
    name: str
    data: str


class SseReader:
    """Events of an SSE response as they arrive; ``next()`` is None at the end of the stream."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.last_id: str | None = None

    async def next(self) -> Event | None:
        event_id: str | None = None
        name, data, saw_field = "message", [], False
        while True:
            raw = await self.response.content.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if saw_field:
                    if event_id is not None:
                        self.last_id = event_id
                    return Event(event_id, name, "\n".join(data))
                continue
            if line.startswith(":"):
                continue
            fname, _, value = line.partition(":")
            value = value.removeprefix(" ")
            saw_field = True
            if fname == "id":
                event_id = value
            elif fname == "event":
                name = value
            elif fname == "data":
                data.append(value)


class Stream:
    """An open SSE response of one client, whose messages go through the observer."""

    def __init__(self, peer: Peer, response: aiohttp.ClientResponse, via: str, started: int) -> None:
        self.peer, self.response, self.via, self.started = peer, response, via, started
        self.reader = SseReader(response)
        self.messages: list[Any] = []

    @property
    def last_id(self) -> str | None:
        return self.reader.last_id

    async def next_event(self) -> Event | None:
        async with asyncio.timeout(PATIENCE_S):
            event = await self.reader.next()
        if event is not None and event.data.strip()[:1] in ("{", "["):
            self.messages.extend(
                self.peer.observer.see(
                    self.peer.user, json.loads(event.data), f"{self.via}, {self.peer.label}", self.started
                )
            )
        return event

    async def until(self, predicate: Any) -> Any:
        """Read until a message satisfying ``predicate`` arrives; returns it (AssertionError at the end)."""
        seen = len(self.messages)
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            if await self.next_event() is None:
                raise AssertionError(f"the stream ended without the message wanted; it carried {self.messages}")

    async def until_id(self, rid: Any) -> dict[str, Any]:
        message: dict[str, Any] = await self.until(
            lambda m: isinstance(m, dict) and m.get("id") == rid and "method" not in m
        )
        return message

    async def drain(self) -> list[Any]:
        """Read to the end of the stream."""
        while await self.next_event() is not None:
            pass
        return self.messages

    def cut(self) -> None:
        """Drop the connection, as a client that goes away does."""
        self.response.close()


class Peer:
    """One API key of one user, speaking raw JSON-RPC to the gateway."""

    def __init__(
        self,
        gw: Gateway,
        user: str,
        key: str,
        observer: Observer,
        http: aiohttp.ClientSession,
        label: str = "",
        server: str = "weather",
    ) -> None:
        self.gw, self.user, self.key, self.observer, self.http = gw, user, key, observer, http
        self.label = label or user
        self.server = server
        self.session: str | None = None
        self.version = "2025-11-25"

    @property
    def url(self) -> str:
        return self.gw.url(self.server)

    def headers(self, session: str | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {**ACCEPT, "Authorization": f"Bearer {self.key}"}
        sid = session or self.session
        if sid is not None:
            headers["Mcp-Session-Id"] = sid
            headers["MCP-Protocol-Version"] = self.version
        headers.update(extra or {})
        return headers

    async def post(
        self, body: Any, *, url: str | None = None, session: str | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        started = self.observer.tick()
        async with asyncio.timeout(PATIENCE_S):
            async with self.http.post(url or self.url, data=data, headers=self.headers(session, headers)) as resp:
                if resp.content_type == "text/event-stream":
                    stream = Stream(self, resp, "post-sse", started)
                    await stream.drain()
                    return Reply(resp.status, dict(resp.headers), stream.messages, b"")
                raw = await resp.read()
                messages: list[Any] = []
                if resp.content_type == "application/json" and raw.strip():
                    messages = self.observer.see(self.user, json.loads(raw), f"post-json, {self.label}", started)
                return Reply(resp.status, dict(resp.headers), messages, raw)

    @asynccontextmanager
    async def post_stream(
        self, body: Any, *, session: str | None = None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[Stream]:
        started = self.observer.tick()
        async with self.http.post(self.url, json=body, headers=self.headers(session, headers)) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            assert resp.content_type == "text/event-stream", resp.content_type
            yield Stream(self, resp, "post-sse", started)

    @asynccontextmanager
    async def get_stream(
        self, *, session: str | None = None, last_event_id: str | None = None
    ) -> AsyncIterator[Stream]:
        extra = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
        started = self.observer.tick()
        async with self.http.get(self.url, headers=self.headers(session, extra)) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            yield Stream(self, resp, "get-resumed" if last_event_id else "get", started)

    async def delete(self, *, session: str | None = None) -> int:
        async with self.http.delete(self.url, headers=self.headers(session)) as resp:
            await resp.read()
            return resp.status

    async def open_session(self, version: str = "2025-11-25") -> str:
        reply = await self.post(initialize(version))
        assert reply.status == 200, (reply.status, reply.raw)
        self.session = reply.headers["Mcp-Session-Id"]
        self.version = version
        done = await self.post(rpc("notifications/initialized", rid=None))
        assert done.status == 202, (done.status, done.raw)
        return self.session

    @asynccontextmanager
    async def legacy_channel(self) -> AsyncIterator[tuple[Stream, str]]:
        """GET /<server>/sse: the stream and the endpoint it announces (absolute URL), initialized."""
        url = self.url.removesuffix("/mcp") + "/sse"
        headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {self.key}"}
        started = self.observer.tick()
        async with self.http.get(url, headers=headers) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            stream = Stream(self, resp, "legacy-sse", started)
            event = await stream.next_event()
            assert event is not None and event.name == "endpoint", event
            endpoint = str(resp.url.join(URL(event.data.strip())))
            assert (await self.post(initialize("2024-11-05"), url=endpoint)).status == 202
            await stream.until_id(0)
            assert (await self.post(rpc("notifications/initialized", rid=None), url=endpoint)).status == 202
            yield stream, endpoint


@dataclass
class Arena:
    """A gateway in front of one upstream, users with keys on it, and what their clients received."""

    gw: Gateway
    observer: Observer
    peers: dict[str, Peer]
    http: aiohttp.ClientSession
    extra_keys: list[Peer] = field(default_factory=list)

    async def another_key(self, user: str) -> Peer:
        key = await self.gw.ops.create_key(user=user, server="weather")
        n = sum(1 for p in self.extra_keys if p.user == user) + 2
        peer = Peer(self.gw, user, str(key["key"]), self.observer, self.http, label=f"{user}'s key #{n}")
        self.extra_keys.append(peer)
        return peer

    async def money_problems(self, *logs: ResultLog, exact: bool = True, first_paid: bool = True) -> list[str]:
        return await money_problems(self.gw, self.observer, logs, self.peers, exact=exact, first_paid=first_paid)

    async def assert_money_ok(self, *logs: ResultLog) -> None:
        problems = await self.money_problems(*logs)
        assert not problems, "the money invariant is broken:\n  " + "\n  ".join(problems)


@asynccontextmanager
async def arena(
    tmp_path: Path,
    upstream_url: str,
    users: dict[str, str] | None = None,
    prices: dict[str, Any] | None = None,
    **config: Any,
) -> AsyncIterator[Arena]:
    """A gateway (``PRICES``: the priced tools cost 5¢) in front of ``upstream_url``; each user gets
    a balance (cents) and one key, ``arena.peers[user]``."""
    path = write_config(tmp_path, {"weather": upstream_url}, prices or PRICES, **config)
    async with run_gateway(path) as gw, aiohttp.ClientSession() as http:
        observer = Observer()
        peers = {}
        for user, cents in (users or {"alice": "100"}).items():
            peers[user] = Peer(gw, user, await gw.new_user(user, cents), observer, http)
        yield Arena(gw, observer, peers, http)
