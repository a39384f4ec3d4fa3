from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.portal.harness import Portal, run_portal
from tests.upstream_sdk import run_upstream


@pytest.fixture
async def portal(tmp_path: Path) -> AsyncIterator[Portal]:
    """The gateway with its portal (sign-up open) in front of the official SDK's server."""
    async with run_upstream() as upstream:
        async with run_portal(tmp_path, {"weather": upstream.url}) as running:
            yield running
