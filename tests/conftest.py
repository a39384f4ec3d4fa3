from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.upstream_sdk import RunningUpstream, run_upstream


@pytest.fixture(params=["sse", "json"])
async def sdk_upstream(request: pytest.FixtureRequest) -> AsyncIterator[RunningUpstream]:
    """The official SDK's MCPServer on a loopback port, answering in SSE or JSON."""
    async with run_upstream(json_response=request.param == "json") as upstream:
        yield upstream
