"""A minimal stdio MCP server speaking JSON lines by hand, for behaviours the SDK's server never has.

    python -m tests.stdio.line_server [--ignore-sigterm] [--garbage-on-call] [--huge-on-call BYTES]
                                      [--flood-after-call N] [--stderr-lines N] [--forge-on-call]

It answers ``initialize``, ``tools/list`` and ``tools/call`` (tool ``pid``: its process id; tool
``limits``: its soft limits of address space, CPU seconds and open files). With
``--ignore-sigterm`` it ignores SIGTERM (only SIGKILL stops it); on a tool call it can instead write a
line that is not JSON, or one of BYTES bytes, or follow its answer with N ``ping`` requests nobody
waits for. ``--stderr-lines`` writes N lines of 100 bytes to stderr at start. ``--forge-on-call``
answers each tool call also with ids it was never sent: one of its own, and the previous call's again.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--garbage-on-call", action="store_true")
    parser.add_argument("--huge-on-call", type=int, default=0)
    parser.add_argument("--flood-after-call", type=int, default=0)
    parser.add_argument("--stderr-lines", type=int, default=0)
    parser.add_argument("--forge-on-call", action="store_true")
    args = parser.parse_args()
    previous_call: object = None
    for n in range(args.stderr_lines):
        sys.stderr.write(f"log line {n:05d} " + "e" * 84 + "\n")
    sys.stderr.flush()
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    out = sys.stdout
    for line in sys.stdin:
        message = json.loads(line)
        method, rid = message.get("method"), message.get("id")
        if rid is None:
            continue
        if method == "initialize":
            result = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "line-server", "version": "1"},
            }
        elif method == "tools/list":
            result = {"tools": [{"name": "pid", "inputSchema": {"type": "object"}}]}
        elif method == "tools/call" and args.garbage_on_call:
            out.write("this is not JSON\n")
            out.flush()
            continue
        elif method == "tools/call" and args.huge_on_call:
            out.write(json.dumps({"jsonrpc": "2.0", "id": rid, "result": {"pad": "x" * args.huge_on_call}}) + "\n")
            out.flush()
            continue
        elif method == "tools/call" and message["params"].get("name") == "limits":
            limits = [
                resource.getrlimit(r)[0] for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NOFILE)
            ]
            result = {"content": [{"type": "text", "text": json.dumps(limits)}]}
        elif method == "tools/call":
            result = {"content": [{"type": "text", "text": str(os.getpid())}]}
            if args.forge_on_call:
                forged = {"content": [{"type": "text", "text": "forged"}]}
                for other in ("never-sent", previous_call):
                    if other is not None:
                        out.write(json.dumps({"jsonrpc": "2.0", "id": other, "result": forged}) + "\n")
                previous_call = rid
        else:
            result = {}
        out.write(json.dumps({"jsonrpc": "2.0", "id": rid, "result": result}) + "\n")
        if method == "tools/call":
            for n in range(args.flood_after_call):
                out.write(json.dumps({"jsonrpc": "2.0", "id": f"flood-{n}", "method": "ping"}) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
