"""FastMCP's own proxy (``create_proxy``, fastmcp 4.x) in front of an upstream URL, served over
stateless HTTP with JSON responses. Runs in the bench's FastMCP virtualenv:
``bench/.venvs/fastmcp/bin/python bench/fastmcp_proxy.py UPSTREAM_URL PORT``.
"""

from __future__ import annotations

import sys

from fastmcp.server import create_proxy

if __name__ == "__main__":
    proxy = create_proxy(sys.argv[1], name="bench-proxy")
    proxy.run(
        transport="http",
        host="127.0.0.1",
        port=int(sys.argv[2]),
        stateless_http=True,
        json_response=True,
        show_banner=False,
        log_level="warning",
    )
