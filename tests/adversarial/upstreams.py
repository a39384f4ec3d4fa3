"""Upstreams for the adversarial billing tests. Every one of them mints a unique token into the text
of each successful priced result it produces and logs it, so a test can tell exactly which priced
results exist, whose they are (the token names the user the call was made for) and which of them
reached a client.

- ``ScriptedUpstream`` (aiohttp, on an ephemeral loopback port): a hand-written MCP server with
  2025-11-25 tasks (task-augmented ``tools/call``, ``tasks/get``, ``tasks/result`` blocking until the
  task is terminal, ``tasks/cancel`` refused with -32602 once it is terminal, ``tasks/list``), JSON or
  SSE answers, sessions, and a per-session outbox: an answer whose POST stream is gone is kept and
  delivered on the session's next GET (with or without ``Last-Event-ID``), which then ends.
  ``lenient=True`` makes it behave like servers found in the wild: it parses JSON numbers as doubles
  (as JavaScript does, so an id above 2**53 comes back changed) and answers every batch item that
  has an ``id`` — an id-only, response- or error-shaped item included — with an error for that id.
- ``run_sdk_upstream``: the official Python SDK's ``MCPServer`` (streamable HTTP, optionally with an
  event store so streams can be resumed with ``Last-Event-ID``, or the legacy HTTP+SSE transport).

Tools (both kinds): ``paid`` (a priced result at once), ``slow`` (a priced result once the test
releases its ``gate``), ``echo`` (free), ``fail`` (a tool error), ``crash`` (a JSON-RPC error). A
call's ``tag`` argument starts with the name of the user it is made for (``"alice"``,
``"alice.3"``): the token carries that name.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from tests.upstream_sdk import MemoryEventStore, serve_asgi

TOKEN_RE = re.compile(r"tok-([a-z][a-z0-9]*)-([0-9a-f]{16})")
_OWNER_RE = re.compile(r"[a-z][a-z0-9]*")
PRICED_TOOLS = ("paid", "slow", "fail", "crash")
TASKS_CAPABILITY = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
PATIENCE_S = 10.0


def owner_of(token: str) -> str:
    match = TOKEN_RE.fullmatch(token)
    assert match is not None, token
    return match.group(1)


def tokens_in(value: Any) -> set[str]:
    """Every result token anywhere in a JSON value."""
    return {m.group(0) for m in TOKEN_RE.finditer(json.dumps(value))}


@dataclass
class Minted:
    token: str
    tool: str
    tag: str


@dataclass
class ResultLog:
    """The priced results an upstream produced (``minted``) and each time it wrote one out (``sent``)."""

    minted: dict[str, Minted] = field(default_factory=dict)
    sent: list[str] = field(default_factory=list)

    def mint(self, tool: str, tag: Any) -> str:
        tag = str(tag)
        owner = tag.split(".", 1)[0]
        if not _OWNER_RE.fullmatch(owner):
            owner = "nobody"
        token = f"tok-{owner}-{secrets.token_hex(8)}"
        self.minted[token] = Minted(token, tool, tag)
        return token

    def record_sent(self, value: Any) -> None:
        self.sent.extend(sorted(tokens_in(value)))


class Gates:
    """Tools that wait for the test: ``slow`` with ``gate`` G announces ``started(G)``, waits for
    ``release(G)`` and announces ``finished(G)`` once its result exists."""

    def __init__(self) -> None:
        self._started: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._release: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._finished: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.all_released = False

    def release(self, gate: str) -> None:
        self._release[gate].set()

    def release_all(self) -> None:
        self.all_released = True
        for event in list(self._release.values()):
            event.set()

    async def wait(self, gate: str) -> None:
        self._started[gate].set()
        if not self.all_released:
            await self._release[gate].wait()

    def finish(self, gate: str) -> None:
        self._finished[gate].set()

    async def started(self, gate: str) -> None:
        async with asyncio.timeout(PATIENCE_S):
            await self._started[gate].wait()

    async def finished(self, gate: str) -> None:
        async with asyncio.timeout(PATIENCE_S):
            await self._finished[gate].wait()

    def has_started(self, gate: str) -> bool:
        return self._started[gate].is_set()


class Signal:
    """A counter that can be waited on: ``await signal.reached(n)``."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def reached(self, n: int) -> None:
        async with asyncio.timeout(PATIENCE_S):
            while self.count < n:
                await self._changed.wait()


def js_number(value: float) -> int | float:
    """How JavaScript's JSON.stringify writes a number it parsed: integral doubles below 1e21 are
    written as integers with the double's shortest digits (2**63 + 5 → 9223372036854776000)."""
    if value.is_integer() and abs(value) < 1e21:
        return int(Decimal(repr(value)))
    return value


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _result(rid: Any, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}


def _text(text: str, *, is_error: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"content": [{"type": "text", "text": text}]}
    if is_error:
        result["isError"] = True
    return result


@dataclass
class UpTask:
    task_id: str
    tool: str
    created_at: str
    status: str = "working"
    outcome: tuple[str, dict[str, Any]] | None = None  # ("result", CallToolResult) | ("error", error object)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    runner: asyncio.Task[None] | None = None

    def view(self) -> dict[str, Any]:
        return {
            "taskId": self.task_id,
            "status": self.status,
            "createdAt": self.created_at,
            "lastUpdatedAt": _now(),
            "ttl": 60000,
            "pollInterval": 100,
        }


@dataclass
class UpSession:
    id: str
    outbox: list[dict[str, Any]] = field(default_factory=list)  # answers whose POST stream was gone


@dataclass
class ScriptedUpstream:
    lenient: bool = False  # ids parsed as doubles; every batch item with an id gets an answer
    sse: bool = False  # answer requests with an SSE stream whose events carry ids (else JSON)
    priming: bool = False  # SSE: open every POST stream with a priming event (an id, empty data)
    log: ResultLog = field(default_factory=ResultLog)
    gates: Gates = field(default_factory=Gates)
    requests: list[Any] = field(default_factory=list)  # every JSON-RPC message received, as parsed
    sessions: dict[str, UpSession] = field(default_factory=dict)
    tasks: dict[str, UpTask] = field(default_factory=dict)
    disconnects: Signal = field(default_factory=Signal)  # POST streams the gateway dropped
    undelivered: Signal = field(default_factory=Signal)  # answers put in a session's outbox
    _event_ids: int = 0
    _runs: set[asyncio.Task[Any]] = field(default_factory=set)
    _inflight: dict[str, set[asyncio.Task[Any]]] = field(default_factory=dict)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/mcp", self._post)
        app.router.add_get("/mcp", self._get)
        app.router.add_delete("/mcp", self._delete)
        return app

    # --- what the tests look at ------------------------------------------------------------------

    def methods_seen(self, method: str) -> list[dict[str, Any]]:
        return [m for m in self.flat_requests() if m.get("method") == method]

    def ids_seen(self) -> list[Any]:
        return [m["id"] for m in self.flat_requests() if "id" in m]

    def flat_requests(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for value in self.requests:
            out.extend(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, dict))
        return out

    async def task_done(self, task_id: str) -> None:
        async with asyncio.timeout(PATIENCE_S):
            await self.tasks[task_id].done.wait()

    async def close(self) -> None:
        self.gates.release_all()
        for run in list(self._runs):
            run.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)

    # --- HTTP ------------------------------------------------------------------------------------

    def _parse(self, raw: bytes) -> Any:
        if self.lenient:
            return json.loads(raw, parse_int=float)  # every number a double, as in JavaScript
        return json.loads(raw)

    def _echo(self, rid: Any) -> Any:
        return js_number(rid) if isinstance(rid, float) else rid

    def _next_event_id(self) -> str:
        self._event_ids += 1
        return str(self._event_ids)

    def _event(self, body: dict[str, Any] | None) -> bytes:
        data = "" if body is None else json.dumps(body)
        return f"id: {self._next_event_id()}\nevent: message\ndata: {data}\n\n".encode()

    async def _post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            value = self._parse(raw)
        except ValueError:
            return web.json_response(_error(None, -32700, "Parse error"), status=400)
        self.requests.append(value)
        session: UpSession | None = None
        sid = request.headers.get("Mcp-Session-Id")
        if sid is not None:
            session = self.sessions.get(sid)
            if session is None:
                return web.json_response(_error(None, -32001, "Session not found"), status=404)
        items = value if isinstance(value, list) else [value]
        headers: dict[str, str] = {}
        answers: list[asyncio.Task[dict[str, Any]]] = []
        for item in items:
            if not isinstance(item, dict):
                if self.lenient:
                    answers.append(self._spawn(self._const(_error(None, -32600, "Invalid Request"))))
                continue
            method, has_id = item.get("method"), "id" in item
            if isinstance(method, str) and has_id:
                if method == "initialize" and session is None:
                    session = UpSession(uuid.uuid4().hex)
                    self.sessions[session.id] = session
                    headers["Mcp-Session-Id"] = session.id
                answers.append(self._spawn(self._answer(item), key=self._id_key(item["id"])))
            elif has_id and self.lenient:  # id-only, response- or error-shaped: answered anyway
                rid = self._echo(item["id"])
                answers.append(self._spawn(self._const(_error(rid, -32600, "Invalid Request: not a request"))))
            elif method == "notifications/cancelled":
                self._cancel_inflight((item.get("params") or {}).get("requestId"))
        if not answers:
            return web.Response(status=202, headers=headers)
        if self.sse:
            return await self._answer_sse(request, answers, session, headers)
        done = await asyncio.gather(*answers)
        body: Any = done if isinstance(value, list) else done[0]
        self.log.record_sent(body)
        return web.json_response(body, headers=headers)

    async def _answer_sse(
        self,
        request: web.Request,
        answers: list[asyncio.Task[dict[str, Any]]],
        session: UpSession | None,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        left = set(answers)
        try:
            await response.prepare(request)
            if self.priming:
                await response.write(self._event(None))
            while left:
                done, _ = await asyncio.wait(left, return_when=asyncio.FIRST_COMPLETED)  # never cancels them
                for answer in done:
                    await response.write(self._event(answer.result()))
                    left.discard(answer)
                    self.log.record_sent(answer.result())
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects.bump()
            raise
        finally:
            for answer in left:  # the stream is gone: keep what it would have carried for a GET
                answer.add_done_callback(lambda a, s=session: self._keep(s, a))
        return response

    def _keep(self, session: UpSession | None, answer: asyncio.Task[dict[str, Any]]) -> None:
        if session is not None and not answer.cancelled() and answer.exception() is None:
            session.outbox.append(answer.result())
            self.undelivered.bump()

    async def _get(self, request: web.Request) -> web.StreamResponse:
        session = self.sessions.get(request.headers.get("Mcp-Session-Id", ""))
        if session is None:
            return web.json_response(_error(None, -32001, "Session not found"), status=404)
        if "text/event-stream" not in request.headers.get("Accept", ""):
            return web.Response(status=406)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        while session.outbox:  # lenient: whatever the session missed, whatever Last-Event-ID says
            body = session.outbox.pop(0)
            await response.write(self._event(body))
            self.log.record_sent(body)
        await response.write_eof()
        return response

    async def _delete(self, request: web.Request) -> web.Response:
        self.sessions.pop(request.headers.get("Mcp-Session-Id", ""), None)
        return web.Response(status=200)

    # --- JSON-RPC --------------------------------------------------------------------------------

    def _spawn(self, coro: Any, key: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        if key is not None:
            self._inflight.setdefault(key, set()).add(task)
            task.add_done_callback(lambda t: self._inflight.get(key, set()).discard(t))
        return task

    @staticmethod
    async def _const(body: dict[str, Any]) -> dict[str, Any]:
        return body

    def _id_key(self, rid: Any) -> str:
        return json.dumps(self._echo(rid))

    def _cancel_inflight(self, request_id: Any) -> None:
        for task in self._inflight.pop(self._id_key(request_id), set()):
            task.cancel()

    async def _answer(self, msg: dict[str, Any]) -> dict[str, Any]:
        rid = self._echo(msg["id"])
        method = msg["method"]
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        try:
            return await self._dispatch(rid, method, params)
        except asyncio.CancelledError:
            return _error(rid, -32800, "Request cancelled")

    async def _dispatch(self, rid: Any, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "initialize":
            return _result(
                rid,
                {
                    "protocolVersion": params.get("protocolVersion", "2025-11-25"),
                    "capabilities": {"tools": {}, "tasks": TASKS_CAPABILITY},
                    "serverInfo": {"name": "adversarial-upstream", "version": "1.0"},
                },
            )
        if method == "ping":
            return _result(rid, {})
        if method == "tools/list":
            tools = [
                {"name": n, "inputSchema": {"type": "object"}, "execution": {"taskSupport": "optional"}}
                for n in ("echo", *PRICED_TOOLS)
            ]
            return _result(rid, {"tools": tools})
        if method == "tools/call":
            name, args = params.get("name"), params.get("arguments") or {}
            if isinstance(params.get("task"), dict):
                return _result(rid, {"task": self._start_task(str(name), args).view()})
            kind, body = await self._run_tool(name, args)
            return _result(rid, body) if kind == "result" else {"jsonrpc": "2.0", "id": rid, "error": body}
        if method in ("tasks/get", "tasks/result", "tasks/cancel"):
            task = self.tasks.get(str(params.get("taskId")))
            if task is None:
                return _error(rid, -32602, "Failed to retrieve task: Task not found")
            if method == "tasks/get":
                return _result(rid, task.view())
            if method == "tasks/cancel":
                if task.done.is_set():
                    return _error(rid, -32602, f"Cannot cancel task: already in terminal status '{task.status}'")
                task.status = "cancelled"
                task.outcome = ("error", {"code": -32800, "message": "The task was cancelled"})
                task.done.set()
                if task.runner is not None:
                    task.runner.cancel()
                return _result(rid, {**task.view(), "statusMessage": "The task was cancelled by request."})
            await task.done.wait()  # tasks/result blocks until the task is terminal
            assert task.outcome is not None
            kind, body = task.outcome
            if kind == "error":
                return {"jsonrpc": "2.0", "id": rid, "error": body}
            meta = {"io.modelcontextprotocol/related-task": {"taskId": task.task_id}}
            return _result(rid, {**body, "_meta": meta})
        if method == "tasks/list":
            return _result(rid, {"tasks": [t.view() for t in self.tasks.values()]})
        return _error(rid, -32601, f"Method not found: {method}")

    def _start_task(self, name: str, args: dict[str, Any]) -> UpTask:
        task = UpTask(task_id=str(uuid.uuid4()), tool=name, created_at=_now())
        self.tasks[task.task_id] = task

        async def run() -> None:
            kind, body = await self._run_tool(name, args)
            if task.done.is_set():  # cancelled meanwhile: stays cancelled
                return
            task.outcome = (kind, body)
            task.status = "completed" if kind == "result" and not body.get("isError") else "failed"
            task.done.set()

        task.runner = self._spawn(run())
        return task

    async def _run_tool(self, name: Any, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        tag = args.get("tag", "nobody")
        if name == "echo":
            return "result", _text(str(args.get("message", "")))
        if name == "paid":
            return "result", _text(f"paid result {self.log.mint('paid', tag)}")
        if name == "slow":
            gate = str(args.get("gate", ""))
            await self.gates.wait(gate)
            token = self.log.mint("slow", tag)
            self.gates.finish(gate)
            return "result", _text(f"slow result {token}")
        if name == "fail":
            return "result", _text("the tool failed", is_error=True)
        if name == "crash":
            return "error", {"code": -32603, "message": "the tool crashed"}
        return "error", {"code": -32602, "message": f"Unknown tool: {name}"}


@asynccontextmanager
async def run_scripted_upstream(
    *, lenient: bool = False, sse: bool = False, priming: bool = False
) -> AsyncIterator[tuple[str, ScriptedUpstream]]:
    """A ``ScriptedUpstream`` on a loopback ephemeral port: (its /mcp URL, the upstream)."""
    upstream = ScriptedUpstream(lenient=lenient, sse=sse, priming=priming)
    server = TestServer(upstream.app(), host="127.0.0.1", port=None)
    await server.start_server()
    try:
        yield str(server.make_url("/mcp")), upstream
    finally:
        await upstream.close()
        await server.close()


# --- the official Python SDK's server ---------------------------------------------------------


class SignallingEventStore(MemoryEventStore):
    """The suite's in-memory event store, announcing each replay it served."""

    def __init__(self) -> None:
        super().__init__()
        self.replays = Signal()

    async def replay_events_after(self, last_event_id: str, send_callback: Any) -> str | None:
        try:
            return await super().replay_events_after(last_event_id, send_callback)
        finally:
            self.replays.bump()


@dataclass
class SdkUpstream:
    url: str  # the streamable HTTP endpoint (its /sse sibling for the legacy transport)
    log: ResultLog
    gates: Gates
    events: SignallingEventStore | None


def build_sdk_server(log: ResultLog, gates: Gates) -> MCPServer:
    srv = MCPServer("adversarial-sdk")

    @srv.tool()
    def paid(tag: str) -> str:
        """A priced result at once."""
        return f"paid result {log.mint('paid', tag)}"

    @srv.tool()
    async def slow(tag: str, gate: str) -> str:
        """A priced result once the test releases the gate."""
        await gates.wait(gate)
        token = log.mint("slow", tag)
        gates.finish(gate)
        return f"slow result {token}"

    @srv.tool()
    def echo(message: str) -> str:
        """Free."""
        return message

    @srv.tool()
    def fail(tag: str) -> str:
        """Always fails (a tool error)."""
        raise ToolError("the tool failed")

    @srv.tool()
    def crash(tag: str) -> str:
        """Always fails (a JSON-RPC error)."""
        raise MCPError(-32603, "the tool crashed")

    return srv


@asynccontextmanager
async def run_sdk_upstream(*, resumable: bool = False, legacy_sse: bool = False) -> AsyncIterator[SdkUpstream]:
    log, gates = ResultLog(), Gates()
    store = SignallingEventStore() if resumable else None
    server = build_sdk_server(log, gates)
    app = (
        server.sse_app()
        if legacy_sse
        else server.streamable_http_app(event_store=store, retry_interval=100 if resumable else None)
    )
    async with serve_asgi(app) as base:
        try:
            yield SdkUpstream(f"{base}/mcp", log, gates, store)
        finally:
            gates.release_all()
