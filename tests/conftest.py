from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import structlog

from tests.upstream_sdk import RunningUpstream, run_upstream


@pytest.fixture(params=["sse", "json"])
async def sdk_upstream(request: pytest.FixtureRequest) -> AsyncIterator[RunningUpstream]:
    """The official SDK's MCPServer on a loopback port, answering in SSE or JSON."""
    async with run_upstream(json_response=request.param == "json") as upstream:
        yield upstream


@pytest.fixture(autouse=True)
def structlog_defaults() -> Iterator[None]:
    """A test that runs a CLI command in-process configures logging for the whole process (stderr,
    warnings only): put structlog back so the next test's ``capture_logs`` sees every event."""
    yield
    structlog.reset_defaults()
