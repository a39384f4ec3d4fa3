"""structlog set-up: JSON lines in production, a pretty console on a TTY. Called by the CLI only."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

from gateway.keys import redact_secrets


def configure(fmt: Literal["auto", "json", "console"] = "auto", level: int = logging.INFO) -> None:
    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiohttp's own access log prints raw paths, which may embed keys: the canonical request
    # line replaces it. Its error logger stays, at warning level, with anything key-shaped redacted
    # (a malformed request line or header is quoted in its messages and tracebacks).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


class RedactingFormatter(logging.Formatter):
    """Formats stdlib log records (tracebacks included) with key-shaped text redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))
