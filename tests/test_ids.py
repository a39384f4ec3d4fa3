"""Call ids: time-ordered (UUIDv7 layout), 80 random bits each, never sharing random bits."""

from __future__ import annotations

import random
import re
import time

import pytest

from gateway.ids import TimeOrderedIds

_SHAPE = re.compile(r"[0-9a-f]{32}")


def _millis(call_id: str) -> int:
    return int(call_id[:12], 16)


def test_an_id_is_32_hex_digits_that_start_with_the_unix_milliseconds_it_was_made_at() -> None:
    ids = TimeOrderedIds()
    before = time.time_ns() // 1_000_000
    made = [ids.next(), TimeOrderedIds().next()]
    after = time.time_ns() // 1_000_000
    for call_id in made:
        assert _SHAPE.fullmatch(call_id)
        assert before <= _millis(call_id) <= after


def test_ids_made_later_sort_after_ids_made_earlier_across_a_millisecond() -> None:
    ids = TimeOrderedIds()
    first = ids.next()
    while time.time_ns() // 1_000_000 == _millis(first):  # a busy wait of under 1 ms, no sleep
        pass
    assert ids.next() > first


def _recorded_urandom(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Replace the system's random source with a seeded one; record every chunk it hands out."""
    chunks: list[bytes] = []

    def urandom(size: int) -> bytes:
        chunks.append(random.Random(len(chunks)).randbytes(size))
        return chunks[-1]

    monkeypatch.setattr("gateway.ids.os.urandom", urandom)
    return chunks


def test_each_random_byte_goes_into_exactly_one_id_and_the_source_is_read_256_ids_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunks = _recorded_urandom(monkeypatch)
    ids = TimeOrderedIds()
    count = 600
    random_parts = b"".join(bytes.fromhex(ids.next()[12:]) for _ in range(count))
    assert [len(chunk) for chunk in chunks] == [10 * 256] * 3  # ceil(600 / 256) reads
    assert random_parts == b"".join(chunks)[: count * 10]  # in order, none skipped, none reused


def test_two_sources_each_read_their_own_random_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = _recorded_urandom(monkeypatch)
    a, b = TimeOrderedIds(), TimeOrderedIds()
    first, second = a.next()[12:], b.next()[12:]
    assert len(chunks) == 2  # no buffer shared between them
    assert (bytes.fromhex(first), bytes.fromhex(second)) == (chunks[0][:10], chunks[1][:10])
