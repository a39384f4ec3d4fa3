"""Applies resource limits, then becomes the stdio server: ``python -I -S launcher.py AS CPU NOFILE -- argv…``.

Run as a script in a fresh interpreter (never imported by the gateway): setting limits between
fork and exec from the gateway itself (``preexec_fn``) is unsafe in a process that runs threads.
Each limit is a number, or ``-`` for none. The limits hold for the server and everything it starts.
"""

import os
import resource
import sys


def main(argv: list[str]) -> None:
    if len(argv) < 5 or argv[3] != "--":
        sys.stderr.write("usage: launcher.py AS_BYTES CPU_S NOFILE -- COMMAND [ARG...]\n")
        sys.exit(2)
    for limit, text in zip((resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_NOFILE), argv[:3], strict=True):
        if text != "-":
            value = int(text)
            resource.setrlimit(limit, (value, value))
    command = argv[4:]
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"cannot start {command[0]!r}: {exc.strerror}\n")
        sys.exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
