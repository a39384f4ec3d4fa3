"""Coverage-guided fuzz targets (atheris / libFuzzer) for the JSON-RPC and SSE parsers.

Not part of the pytest suite (atheris is not a test dependency). Run, e.g.:

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.fuzz.atheris_targets jsonrpc -atheris_runs=100000
    .venv/bin/python -m tests.fuzz.atheris_targets sse -atheris_runs=100000 -max_len=4096
    .venv/bin/python -m tests.fuzz.atheris_targets jsonrpc CORPUS_DIR -max_total_time=600

Everything after the target name goes to libFuzzer. A crash (any exception other than a
``GatewayError`` with a message, or a broken invariant) writes ``crash-<sha1>`` with the input and
exits non-zero; replay it with ``python -m tests.fuzz.atheris_targets jsonrpc crash-<sha1>``.

Known, already-reported bugs (see the xfail regressions in tests/fuzz/) stop a run at once; set
``AGENTPAY_FUZZ_SKIP_KNOWN=1`` to step over them and look for new ones.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

with atheris.instrument_imports(include=["gateway"]):
    from gateway import jsonrpc, sse
    from gateway.errors import GatewayError, HeaderMismatch

SKIP_KNOWN = os.environ.get("AGENTPAY_FUZZ_SKIP_KNOWN") == "1"


def _known(exc: BaseException) -> bool:
    """Crashes already reported (and pinned by xfail tests), skipped only on request."""
    if not SKIP_KNOWN:
        return False
    # test_deeply_nested_json_is_a_parse_error / test_every_accepted_message_can_be_re_encoded
    return isinstance(exc, RecursionError | UnicodeEncodeError)


def fuzz_jsonrpc(data: bytes) -> None:
    # The whole input is the body (so seeds and the dictionary work as JSON); the batch limit and
    # the Mcp-Method / Mcp-Name headers are derived from it.
    max_batch = 1 + len(data) % 16
    try:
        incoming = jsonrpc.parse_body(data, max_batch_items=max_batch)
    except GatewayError as exc:
        assert exc.message.strip(), f"empty message from {type(exc).__name__}"
        assert exc.http_status == 400
        return
    except Exception as exc:
        if _known(exc):
            return
        raise
    assert incoming.messages and len(incoming.messages) <= max_batch
    ids = [m.id for m in incoming.messages if m.is_request]
    assert len(ids) == len(set(ids))
    for msg in incoming.messages:
        assert msg.body.get("jsonrpc") == "2.0"
        msg.priced_target()
        try:
            jsonrpc.dumps(msg.body)  # the proxy re-encodes forwarded batches and error ids
        except UnicodeEncodeError as exc:
            if not _known(exc):
                raise
    first = incoming.messages[0]
    target = first.priced_target()
    agreeing = (first.method, target[1] if target else None)
    for mcp_method, mcp_name in (agreeing, (None, None), ("tools/call", "x"), (first.method, "other")):
        try:
            jsonrpc.check_routing_headers(incoming, mcp_method, mcp_name)
        except HeaderMismatch as exc:
            assert exc.message.strip()
            assert (mcp_method, mcp_name) != agreeing
    value: Any = json.loads(data)
    for item in jsonrpc.responses_in(value):
        assert isinstance(jsonrpc.classify_response(item), jsonrpc.Outcome)
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            assert isinstance(jsonrpc.classify_response(item), jsonrpc.Outcome)


def fuzz_sse(data: bytes) -> None:
    # The whole input is the stream; chunk boundaries and the size limit are derived from it.
    stream = data
    limit = 1 + (len(data) * 31) % 256 if len(data) % 2 else None
    cuts = [i for i, byte in enumerate(data) if byte % 5 == 0]
    whole = sse.Parser()
    events = whole.feed(stream)
    assert b"".join(e.raw for e in events) + whole.pending() == stream
    pieces, start = [], 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[start:cut])
        start = cut
    split = sse.Parser()
    again = [e for piece in pieces for e in split.feed(piece)]
    assert [(e.raw, e.lines) for e in again] == [(e.raw, e.lines) for e in events]
    assert split.pending() == whole.pending()
    for event in events:
        event.data, event.id, event.name  # noqa: B018  # derived fields must never raise
        replacement = (event.data or "x").replace("\r", "")
        back = sse.Parser().feed(event.with_data(replacement))
        assert len(back) == 1 and back[0].data == replacement and back[0].id == event.id
    if limit is not None:
        fits = all(len(e.raw) <= limit for e in events) and len(whole.pending()) <= limit
        limited = sse.Parser(max_event_bytes=limit)
        try:
            for piece in pieces:
                limited.feed(piece)
        except sse.EventTooLarge:
            assert not fits, "an event within the limit was refused"


TARGETS: dict[str, Callable[[bytes], None]] = {"jsonrpc": fuzz_jsonrpc, "sse": fuzz_sse}
SEEDS: dict[str, list[bytes]] = {
    "jsonrpc": [
        b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_forecast","arguments":{}}}',
        b'[{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"weather://alerts/n"}},'
        b'{"jsonrpc":"2.0","method":"notifications/initialized"}]',
        b'{"jsonrpc":"2.0","id":"a","result":{"content":[],"isError":true,"task":{"taskId":"t"}}}',
        b'{"jsonrpc":"2.0","id":2,"error":{"code":-32000,"message":"x"}}',
    ],
    "sse": [
        b': priming\n\nevent: message\nid: 1\ndata: {"jsonrpc":"2.0","id":1,"result":{}}\n\n',
        b"retry: 100\r\ndata: a\r\ndata: b\r\rid:7\revent:endpoint\n\n",
    ],
}
DICTIONARY = {
    "jsonrpc": [
        '"jsonrpc"', '"2.0"', '"id"', '"method"', '"params"', '"result"', '"error"', '"name"', '"uri"',
        '"tools/call"', '"resources/read"', '"prompts/get"', '"isError"', '"resultType"', '"input_required"',
        '"task"', '"taskId"', '"content"', "null", "true", "false", "NaN", "-Infinity", "1e400", "\\ud800",
    ],
    "sse": ["data:", "data: ", "id:", "event:", "retry:", ":", "\r\n", "\r", "\n\n", "\udcff"],
}  # fmt: skip


def _dict_entry(token: str) -> str:
    """One libFuzzer dictionary line: printable ASCII as is, anything else as \\xHH."""
    raw = token.encode("utf-8", "surrogateescape")
    body = "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\x{b:02x}" for b in raw)
    return f'"{body}"\n'


def _prepare(name: str, args: list[str]) -> list[str]:
    """Without a corpus directory, start from built-in seeds in a temporary one; add the dictionary."""
    extra: list[str] = []
    if not any(arg.startswith("-dict=") for arg in args):
        fd, path = tempfile.mkstemp(prefix=f"agentpay-{name}-", suffix=".dict")
        with os.fdopen(fd, "w") as out:
            out.writelines(_dict_entry(token) for token in DICTIONARY[name])
        extra.append(f"-dict={path}")
    positional = [arg for arg in args if not arg.startswith("-")]
    if not positional:
        corpus = tempfile.mkdtemp(prefix=f"agentpay-{name}-corpus-")
        for i, seed in enumerate(SEEDS[name]):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as out:
                out.write(seed)
        extra.append(corpus)
    return [*args, *extra]


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.atheris_targets {{{'|'.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *_prepare(sys.argv[1], sys.argv[2:])], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
