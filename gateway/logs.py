"""structlog set-up: JSON lines in production, a pretty console on a TTY. Called by the CLI only.

The JSON chain is on every request's path (one canonical line per request), so it is kept short:
the level, a timestamp whose date-and-seconds part is formatted once per second, orjson, and bytes
gathered per event-loop iteration and written to stderr's binary stream in one system call.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
import threading
import time
from typing import Any, BinaryIO, Literal

import orjson
import structlog
from structlog.typing import EventDict

from gateway.keys import redact_secrets


def configure(
    fmt: Literal["auto", "json", "console"] = "auto", level: int = logging.INFO, *, cache: bool = True
) -> None:
    """Send log events to stderr. ``cache=False`` (one-shot CLI commands) leaves loggers unbound to this
    configuration, so a later ``configure`` or ``structlog.testing.capture_logs`` still reaches them."""
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    logger_factory: Any
    if use_console:
        processors += [structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.dev.ConsoleRenderer()]
        logger_factory = structlog.PrintLoggerFactory(file=sys.stderr)
    else:
        processors += [IsoUtcStamper(), render_json]
        lines = LineWriter(sys.stderr.buffer)
        atexit.register(lines.flush)

        def logger_factory(*args: Any) -> LineWriter:
            return lines

    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    # aiohttp's own access log prints raw paths, which may embed keys: the canonical request
    # line replaces it. Its error logger stays, at warning level, with anything key-shaped redacted
    # (a malformed request line or header is quoted in its messages and tracebacks).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def info_fields(logger: Any, event: str, fields: dict[str, Any]) -> None:
    """``logger.info(event, **fields)`` for a dict the caller built, through the same configured chain
    (level filter, processors, output; ``structlog.testing.capture_logs`` sees it as usual). structlog
    hands keyword arguments on through ``info``, ``_proxy_to_logger`` and ``dict.update``; for the
    per-request line that copying was a third of the line's cost. Here the dict goes straight to
    ``_process_event``, the hook structlog provides for custom wrapper classes."""
    bound = logger.bind()  # a lazy proxy's configured logger (built once with cache_logger_on_first_use)
    process = getattr(bound, "_process_event", None)
    enabled = getattr(bound, "is_enabled_for", None)
    if process is None or enabled is None:
        bound.info(event, **fields)
        return
    if not enabled(logging.INFO):
        return
    try:
        args, kw = process("info", event, fields)
    except structlog.DropEvent:
        return
    bound._logger.info(*args, **kw)


class LineWriter:
    """A structlog logger for rendered bytes. On a thread running an event loop, lines are gathered
    and written once per loop iteration, in one system call for every request that iteration
    finished (each system call on the loop's thread is also a chance for a ledger thread to take the
    GIL and stall the loop); without a running loop a line is written at once."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self._pending: list[bytes] = []
        self._lock = threading.Lock()

    def msg(self, message: bytes) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._pending.append(message)
            first = len(self._pending) == 1
        if loop is None:
            self.flush()
        elif first:
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg

    def flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            self._pending.append(b"")
            data = b"\n".join(self._pending)
            self._pending.clear()
            self._file.write(data)
            self._file.flush()


class IsoUtcStamper:
    """``timestamp`` as ISO 8601 UTC with microseconds ("2026-11-27T05:42:01.123456Z"), the same
    text as ``TimeStamper(fmt="iso", utc=True)``; the part up to the seconds is formatted once per
    second instead of building a datetime per line."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, method_name: str, event_dict: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event_dict


def _fallback(value: Any) -> Any:
    """What a value JSON cannot represent is logged as (structlog's own rule)."""
    custom = getattr(value, "__structlog__", None)
    return custom() if callable(custom) else repr(value)


def render_json(logger: Any, method_name: str, event_dict: EventDict) -> bytes:
    """The event as one JSON object, by orjson; what orjson refuses (integers beyond 64 bits, lone
    surrogates) by the standard library, which encodes anything."""
    try:
        return orjson.dumps(event_dict, default=_fallback, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return json.dumps(event_dict, default=_fallback).encode("utf-8", "backslashreplace")


class RedactingFormatter(logging.Formatter):
    """Formats stdlib log records (tracebacks included) with key-shaped text redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))
