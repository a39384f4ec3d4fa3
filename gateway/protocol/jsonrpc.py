"""Pure JSON-RPC 2.0 handling for MCP traffic: parsing requests, classifying responses.

No I/O here. The proxy parses only what pricing needs from requests and only responses whose id
it is waiting for.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.errors import BadRequest, HeaderMismatch, ParseError

PriceKind = Literal["tool", "resource", "prompt"]

PRICED_METHODS: dict[str, tuple[PriceKind, str]] = {
    "tools/call": ("tool", "name"),
    "resources/read": ("resource", "uri"),
    "prompts/get": ("prompt", "name"),
}

LIST_METHODS: dict[str, tuple[PriceKind, str, str]] = {
    # method -> (price kind, result list key, item name field)
    "tools/list": ("tool", "tools", "name"),
    "resources/list": ("resource", "resources", "uri"),
    "prompts/list": ("prompt", "prompts", "name"),
}

RequestId = str | int


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON-RPC message from a client."""

    body: dict[str, Any]

    @property
    def method(self) -> str | None:
        method = self.body.get("method")
        return method if isinstance(method, str) else None

    @property
    def has_id(self) -> bool:
        return "id" in self.body and self.body["id"] is not None

    @property
    def id(self) -> RequestId | None:
        value = self.body.get("id")
        return value if isinstance(value, str | int) and not isinstance(value, bool) else None

    @property
    def is_request(self) -> bool:
        return self.method is not None and self.has_id

    @property
    def is_response(self) -> bool:
        """A client's answer to a server-to-client request (sampling, elicitation, roots)."""
        return self.method is None

    @property
    def params(self) -> dict[str, Any]:
        params = self.body.get("params")
        return params if isinstance(params, dict) else {}

    def priced_target(self) -> tuple[PriceKind, str] | None:
        """(kind, name) for a priceable method, else None. A missing name prices as ""."""
        method = self.method
        if method is None or method not in PRICED_METHODS:
            return None
        kind, field = PRICED_METHODS[method]
        name = self.params.get(field)
        return kind, name if isinstance(name, str) else ""


@dataclass(frozen=True, slots=True)
class Incoming:
    messages: tuple[Message, ...]
    is_batch: bool


_LONG_NUMBER = re.compile(rb"\d{19}")


def loads(body: bytes | str) -> Any:
    """Parse JSON exactly. orjson is fast but turns integers beyond 64 bits into floats, so a body
    with a 19+ digit run goes to the standard library, which keeps every integer exact."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if _LONG_NUMBER.search(raw) is None:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides (and words the error)
    return json.loads(raw)


# Members whose value decides what a call is, what it costs or how it is billed. A body where one
# object names one of them twice is refused: parsers disagree on which copy counts (json and orjson
# keep the last, some streaming parsers the first), so the gateway could price one tool while the
# upstream runs another.
_SINGLE_MEMBERS = frozenset({"jsonrpc", "id", "method", "params", "name", "uri", "taskId", "_meta"})
# Byte-level pre-check: a member can be named twice only if its literal spelling occurs twice, or if
# one spelling is escaped (JSON spells these names differently only with \u escapes).
_SINGLE_MEMBER_LITERALS = tuple(b'"' + name.encode() + b'"' for name in sorted(_SINGLE_MEMBERS))


def _may_repeat_a_member(raw: bytes) -> bool:
    if b"\\u" in raw:
        return True
    for literal in _SINGLE_MEMBER_LITERALS:
        at = raw.find(literal)
        if at >= 0 and raw.find(literal, at + 1) >= 0:
            return True
    return False


def _refuse_repeated_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: the object, unless it names a member of ``_SINGLE_MEMBERS`` twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen and name in _SINGLE_MEMBERS:
                raise BadRequest(
                    f'The request names the member "{name}" twice in one JSON object',
                    hint=f'Send "{name}" once: JSON parsers disagree on which copy counts, so the gateway '
                    "will not guess which one the upstream would use",
                )
            seen.add(name)
    return obj


def _loads_request(raw: bytes) -> Any:
    """Parse a client's body like ``loads``, refusing objects that repeat a ``_SINGLE_MEMBERS`` name
    (BadRequest). orjson keeps the fast path for bodies that cannot repeat one; the rest (and
    everything orjson refuses: other encodings, a BOM, invalid JSON, 19+ digit numbers) is parsed
    by the standard library with a hook that sees every member as written, escapes decoded."""
    if _LONG_NUMBER.search(raw) is None and not _may_repeat_a_member(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # the standard library decides (and words the error)
    return json.loads(raw, object_pairs_hook=_refuse_repeated_members)


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # integers beyond 64 bits, lone surrogates: ASCII escapes encode anything
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def parse_body(body: bytes, *, max_batch_items: int) -> Incoming:
    """Parse a POSTed body into messages. Raises ParseError / BadRequest with a clear message."""
    if not body.strip():
        raise ParseError("The request body is empty; expected a JSON-RPC message")
    try:
        value = _loads_request(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ParseError(f"The request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise ParseError("The request body nests JSON too deeply") from None
    if isinstance(value, list):
        if not value:
            raise BadRequest("An empty JSON-RPC batch is not a valid request")
        if len(value) > max_batch_items:
            raise BadRequest(
                f"The batch has {len(value)} messages; the gateway accepts at most {max_batch_items}",
                hint="Split the batch into smaller ones",
            )
        messages = tuple(_message(item) for item in value)
        ids = [m.id for m in messages if m.is_request]
        if len(ids) != len(set(ids)):
            raise BadRequest("The batch contains the same request id twice; ids must be unique in a batch")
        return Incoming(messages, is_batch=True)
    return Incoming((_message(value),), is_batch=False)


def _message(value: Any) -> Message:
    if not isinstance(value, dict):
        raise BadRequest("A JSON-RPC message must be a JSON object")
    if value.get("jsonrpc") != "2.0":
        raise BadRequest('A JSON-RPC message must carry "jsonrpc": "2.0"')
    if "method" in value and not isinstance(value["method"], str):
        raise BadRequest('"method" must be a string')
    if (
        "id" in value
        and value["id"] is not None
        and (isinstance(value["id"], bool) or not isinstance(value["id"], str | int))
    ):
        raise BadRequest('"id" must be a string or an integer')
    # Neither a request nor a notification: only a response (to a server-to-client request) is left,
    # with an id and exactly one of result/error. Anything else (an id alone, say) would reach the
    # upstream as something it may answer for an id the client chose.
    if "method" not in value and ("id" not in value or ("result" in value) == ("error" in value)):
        raise BadRequest(
            "A JSON-RPC message must be a request (method and id), a notification (method, no id) or "
            "a response (id with exactly one of result or error)",
            hint="Fix or remove the message that has neither a method nor a result or error",
        )
    return Message(value)


def check_routing_headers(incoming: Incoming, mcp_method: str | None, mcp_name: str | None) -> None:
    """2026-07-28: ``Mcp-Method``/``Mcp-Name`` must agree with the body (else 400, -32020), each
    checked whether or not the other is sent."""
    if (mcp_method is None and mcp_name is None) or incoming.is_batch:
        return
    msg = incoming.messages[0]
    if mcp_method is not None and msg.method != mcp_method:
        raise HeaderMismatch(f"The Mcp-Method header says {mcp_method!r} but the body's method is {msg.method!r}")
    if mcp_name is not None:
        target = msg.priced_target()
        body_name = target[1] if target else msg.params.get("name")
        if body_name != mcp_name:
            raise HeaderMismatch(f"The Mcp-Name header says {mcp_name!r} but the body names {body_name!r}")


class Outcome(enum.Enum):
    SUCCESS = "success"
    TOOL_ERROR = "tool_error"  # result with isError: true
    RPC_ERROR = "rpc_error"
    INPUT_REQUIRED = "input_required"
    TASK_CREATED = "task_created"
    INVALID = "invalid"


def classify_response(body: dict[str, Any]) -> Outcome:
    """Whether a response to a priced call is a billable success."""
    if "error" in body:
        return Outcome.RPC_ERROR
    result = body.get("result")
    if not isinstance(result, dict):
        return Outcome.INVALID
    if result.get("isError") is True:
        return Outcome.TOOL_ERROR
    if result.get("resultType") == "input_required":
        return Outcome.INPUT_REQUIRED
    if isinstance(result.get("task"), dict) and "content" not in result and "contents" not in result:
        return Outcome.TASK_CREATED
    return Outcome.SUCCESS


def is_response(value: Any) -> bool:
    return isinstance(value, dict) and "id" in value and ("result" in value or "error" in value)


def responses_in(value: Any) -> Iterable[dict[str, Any]]:
    """The response objects in a parsed JSON body (one object or a batch array)."""
    if isinstance(value, list):
        return [item for item in value if is_response(item)]
    return [value] if is_response(value) else []


def error_body(request_id: RequestId | None, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def result_body(request_id: RequestId | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}
