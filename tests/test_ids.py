"""Call ids: time-ordered (UUIDv7 layout), 80 random bits each, never sharing random bits."""

from __future__ import annotations

import re
import time

from gateway.ids import TimeOrderedIds, time_ordered_hex

_SHAPE = re.compile(r"[0-9a-f]{32}")


def _millis(call_id: str) -> int:
    return int(call_id[:12], 16)


def test_an_id_is_32_hex_digits_that_start_with_the_unix_milliseconds_it_was_made_at() -> None:
    ids = TimeOrderedIds()
    before = time.time_ns() // 1_000_000
    made = [ids.next(), time_ordered_hex()]
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


def test_ids_drawn_past_several_refills_of_the_random_buffer_never_repeat_their_random_part() -> None:
    ids = TimeOrderedIds()
    suffixes = [ids.next()[12:] for _ in range(2_000)]  # ~8 reads of the system's random source
    assert len(set(suffixes)) == len(suffixes)
    assert all(len(s) == 20 for s in suffixes)


def test_two_sources_do_not_hand_out_the_same_random_bits() -> None:
    a, b = TimeOrderedIds(), TimeOrderedIds()
    assert {a.next()[12:] for _ in range(300)}.isdisjoint({b.next()[12:] for _ in range(300)})
