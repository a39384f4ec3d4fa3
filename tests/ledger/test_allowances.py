"""Free allowances (``interfaces.Allowances``): the first N priced calls of a user on a server (or on
one name) each UTC day are free. Counted in the database, exactly, under concurrency, on both stores."""

from __future__ import annotations

import asyncio

from gateway.ledger.base import FreeCall
from gateway.ledger.interfaces import Ledger


def free_call(n: int, *, limit: int = 3, day: str = "2026-03-01", scope: str = "*", user: str = "alice") -> FreeCall:
    return FreeCall(f"call-{day}-{scope}-{user}-{n}", user, "weather", scope, "get_forecast", day, limit)


async def test_concurrent_claims_grant_exactly_the_limit(ledger: Ledger) -> None:
    claims = await asyncio.gather(*(ledger.claim_free_call(free_call(n)) for n in range(20)))
    assert sum(claims) == 3
    assert await ledger.free_calls_used("alice", "weather", "*", "2026-03-01") == 3


async def test_a_claim_given_back_frees_a_place_and_a_used_one_stays_counted(ledger: Ledger) -> None:
    assert [await ledger.claim_free_call(free_call(n)) for n in range(4)] == [True, True, True, False]
    await ledger.settle_free_call(free_call(0).call_id, used=True)
    await ledger.settle_free_call(free_call(1).call_id, used=False)
    await ledger.settle_free_call(free_call(0).call_id, used=False)  # used already: stays counted
    assert await ledger.free_calls_used("alice", "weather", "*", "2026-03-01") == 2
    assert await ledger.claim_free_call(free_call(4))
    assert not await ledger.claim_free_call(free_call(5))


async def test_allowances_are_counted_per_day_scope_and_user(ledger: Ledger) -> None:
    await ledger.create_user("bob")
    for n in range(3):
        assert await ledger.claim_free_call(free_call(n))
    assert not await ledger.claim_free_call(free_call(3))
    assert await ledger.claim_free_call(free_call(0, day="2026-03-02"))
    assert await ledger.claim_free_call(free_call(0, scope="tool:translate"))
    assert await ledger.claim_free_call(free_call(0, user="bob"))
    assert await ledger.verify() == []


async def test_a_replayed_call_id_is_not_counted_twice(ledger: Ledger) -> None:
    assert await ledger.claim_free_call(free_call(0))
    assert not await ledger.claim_free_call(free_call(0))
    assert await ledger.free_calls_used("alice", "weather", "*", "2026-03-01") == 1
