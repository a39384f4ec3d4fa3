"""Pure, incremental Server-Sent Events parsing and encoding.

The parser hands back each event with its exact raw bytes, so the proxy can relay events
untouched (ids, ``retry:``, comments and empty priming events included) and re-encode only an
event whose data it changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class EventTooLarge(ValueError):
    """An upstream event exceeded the configured size limit."""


@dataclass(slots=True)
class Event:
    raw: bytes
    lines: list[str] = field(default_factory=list)  # decoded lines, without line terminators

    @property
    def data(self) -> str | None:
        parts = [value for name, value in self.fields() if name == "data"]
        return "\n".join(parts) if parts else None

    @property
    def id(self) -> str | None:
        ids = [value for name, value in self.fields() if name == "id"]
        return ids[-1] if ids else None

    @property
    def name(self) -> str | None:
        names = [value for name, value in self.fields() if name == "event"]
        return names[-1] if names else None

    def fields(self) -> list[tuple[str, str]]:
        out = []
        for line in self.lines:
            if not line or line.startswith(":"):
                continue
            name, sep, value = line.partition(":")
            if sep and value.startswith(" "):
                value = value[1:]
            out.append((name, value))
        return out

    def with_data(self, data: str) -> bytes:
        """This event re-encoded with new data; every other line kept in place."""
        out: list[str] = []
        placed = False
        for line in self.lines:
            name = line.partition(":")[0] if line and not line.startswith(":") else None
            if name == "data":
                if not placed:
                    out.extend(f"data: {part}" for part in data.split("\n"))
                    placed = True
                continue
            out.append(line)
        if not placed:
            out.extend(f"data: {part}" for part in data.split("\n"))
        return ("\n".join(out) + "\n\n").encode("utf-8")


class Parser:
    """Feed bytes, get complete events. Handles LF, CRLF and CR line endings across chunks."""

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buf = bytearray()
        self._event_start = 0
        self._pos = 0
        self._lines: list[str] = []
        self._max = max_event_bytes

    def feed(self, chunk: bytes) -> list[Event]:
        self._buf += chunk
        events: list[Event] = []
        buf = self._buf
        while True:
            nl = _next_line_end(buf, self._pos)
            if nl is None:
                break
            end, after = nl
            line = bytes(buf[self._pos : end]).decode("utf-8", errors="replace")
            self._pos = after
            if line == "":
                raw = bytes(buf[self._event_start : after])
                events.append(Event(raw, self._lines))
                self._lines = []
                self._event_start = after
            else:
                self._lines.append(line)
        if self._event_start:
            del buf[: self._event_start]
            self._pos -= self._event_start
            self._event_start = 0
        if self._max is not None and len(buf) > self._max:
            raise EventTooLarge(f"an upstream SSE event exceeded {self._max} bytes")
        return events

    def pending(self) -> bytes:
        """Bytes of an incomplete trailing event (a stream that ended mid-event)."""
        return bytes(self._buf)


def _next_line_end(buf: bytearray, start: int) -> tuple[int, int] | None:
    """(end of line, start of next line) or None when no complete line is buffered."""
    lf = buf.find(b"\n", start)
    cr = buf.find(b"\r", start, lf if lf != -1 else len(buf))
    if cr != -1:
        if cr + 1 == len(buf):
            return None  # a CR at the end may be the first half of CRLF
        return (cr, cr + 2) if buf[cr + 1] == 0x0A else (cr, cr + 1)
    if lf != -1:
        return lf, lf + 1
    return None


def encode(data: str, *, event: str | None = None, event_id: str | None = None) -> bytes:
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    if event is not None:
        lines.append(f"event: {event}")
    lines.extend(f"data: {part}" for part in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode("utf-8")
