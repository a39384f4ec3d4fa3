"""Profile a running gateway with py-spy (sampling, non-blocking) while load runs, and summarise
the collapsed stacks: where the samples are (self time) and what they are under (inclusive)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """'handle (gateway/proxy.py:97)' -> 'handle (gateway/proxy.py)' with site-packages trimmed."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{m.group('func')} ({path})"


def summarise(raw: str, top: int = 25) -> dict[str, Any]:
    """Shares of all samples: per thread; self time of the event-loop (main) thread's leaf frames;
    inclusive time of the gateway's own functions (any thread)."""
    self_main: Counter[str] = Counter()
    self_other: Counter[str] = Counter()
    incl_gateway: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        thread = "?"
        if frames and frames[0].startswith("thread"):
            thread = frames[0].split(":", 1)[-1].strip() or frames[0]
            frames = frames[1:]
        frames = [f for f in frames if not f.startswith("process")]
        if not frames:
            continue
        total += count
        threads[thread] += count
        leaf = _short(frames[-1])
        (self_main if thread == "MainThread" else self_other)[
            leaf if thread == "MainThread" else f"{thread}: {leaf}"
        ] += count
        for frame in {_short(f) for f in frames}:
            if "(gateway/" in frame:
                incl_gateway[frame] += count

    def rows(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / total, 4), "samples": n} for f, n in counter.most_common(top)]

    return {
        "samples": total,
        "threads": [{"thread": t, "share": round(n / total, 4)} for t, n in threads.most_common()] if total else [],
        "self_main": rows(self_main) if total else [],
        "self_other_threads": rows(self_other) if total else [],
        "inclusive_gateway": rows(incl_gateway) if total else [],
        "note": "Self time on a Python frame includes the C code it called (sqlite3, uvloop, orjson, "
        "socket writes): with uvloop, time in the loop's own C code shows as Runner.run.",
    }


async def record(pyspy: Path, pid: int, seconds: int, out: Path, rate: int = 250) -> str | None:
    """Run py-spy for ``seconds`` on ``pid`` writing collapsed stacks to ``out``; None or an error."""
    proc = await asyncio.create_subprocess_exec(
        str(pyspy),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(seconds),
        "--rate",
        str(rate),
        "--nonblocking",
        "--threads",
        "--format",
        "raw",
        "--output",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    text, _ = await proc.communicate()
    if proc.returncode != 0 or not await asyncio.to_thread(out.exists):
        return f"py-spy exited {proc.returncode}: {text.decode(errors='replace')[-500:]}"
    return None
