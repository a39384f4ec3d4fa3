"""`python -m gateway` runs the operator CLI."""

from gateway.ops.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
