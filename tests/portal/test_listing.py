"""The catalog's listings: what the gateway itself asks each upstream (initialize, then the list calls),
cached for ``ttl_s`` and refreshed in the background once stale, against the official SDK's server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.portal.listing import Listings
from tests.harness import write_config
from tests.process import free_port
from tests.upstream_sdk import run_upstream


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("json_response", [True, False])
async def test_a_listing_is_cached_then_refreshed_in_the_background_once_stale(
    tmp_path: Path, json_response: bool
) -> None:
    clock = Clock()
    async with run_upstream(json_response=json_response) as upstream:
        config = load_config(write_config(tmp_path, {"weather": upstream.url}))
        listings = Listings(config, ttl_s=60, clock=clock)
        try:
            first = await listings.get("weather")
            assert first.available and first.fetched_at == clock.now
            names = {(e.kind, e.name) for e in first.entries}
            expected = {("tool", "get_forecast"), ("resource", "weather://alerts/{region}"), ("prompt", "daily_brief")}
            assert expected <= names
            clock.now += 59
            assert await listings.get("weather") is first  # fresh: not asked again
            clock.now += 2
            assert await listings.get("weather") is first  # stale: shown now, refreshed behind
            async with asyncio.timeout(10):
                refreshed = await listings.current("weather")
            assert refreshed is not None and refreshed is not first
            assert refreshed.fetched_at == clock.now and refreshed.entries == first.entries
            forced = await listings.get("weather", refresh=True)
            assert forced is not refreshed and forced.available
        finally:
            await listings.close()
    assert upstream.log.completed == []  # listing runs no tool


async def test_an_upstream_that_goes_down_keeps_its_last_listing_marked_unavailable(tmp_path: Path) -> None:
    clock = Clock()
    async with run_upstream() as upstream:
        config_path = write_config(tmp_path, {"weather": upstream.url})
        listings = Listings(load_config(config_path), clock=clock)
        before = await listings.get("weather")
    try:
        after = await listings.get("weather", refresh=True)  # the upstream has stopped
        assert not after.available and after.error
        assert after.entries == before.entries
    finally:
        await listings.close()


async def test_a_server_without_an_upstream_or_with_a_closed_port_is_unavailable(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, {"sdk_only": None, "down": f"http://127.0.0.1:{free_port()}/mcp"}))
    listings = Listings(config, timeout_s=5)
    try:
        sdk_only = await listings.get("sdk_only")
        assert not sdk_only.available and "no upstream" in (sdk_only.error or "")
        down = await listings.get("down")
        assert not down.available and down.entries == ()
    finally:
        await listings.close()
