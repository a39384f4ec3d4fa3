"""Fuzzing the incremental SSE parser (``gateway.protocol.sse``).

The proxy relays upstream SSE event by event from ``Parser.feed`` on whatever chunks the network
delivers, so: the events must not depend on where the chunks were cut; the raw bytes of the events
plus ``pending()`` must be exactly the input (nothing lost, nothing invented — relaying is
byte-exact); an event re-encoded with ``with_data`` must parse back to the same event; and the size
limit may raise ``EventTooLarge`` only, and only for an event that is actually too large.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.protocol import sse
from tests.fuzz.common import fuzz, tried

FRAGMENTS = [
    b"data:",
    b"data: ",
    b"data",
    b"id: ",
    b"id:7",
    b"event: message",
    b"event:endpoint",
    b"retry: 100",
    b":",
    b": priming",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"\r\r",
    b"\r\n\r\n",
    b" ",
    b"{}",
    b'{"jsonrpc":"2.0","id":1,"result":{}}',
    b"\xff",  # invalid UTF-8
    b"\xe2\x82",  # the first two bytes of a 3-byte character ...
    b"\xac",  # ... and its last byte
    b"\x00",
]
streams = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=6), max_size=40).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, start = [], 0
    for point in [*points, len(data)]:
        out.append(data[start:point])
        start = point
    return out


def feed_all(chunks: list[bytes], max_event_bytes: int | None = None) -> tuple[list[sse.Event], bytes]:
    parser = sse.Parser(max_event_bytes=max_event_bytes)
    events: list[sse.Event] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return events, parser.pending()


def shape(events: list[sse.Event]) -> list[tuple[bytes, list[str]]]:
    return [(e.raw, list(e.lines)) for e in events]


cuts = st.lists(st.integers(0, 4096), max_size=12)


@fuzz(800)
@given(data=streams, cut=cuts)
def test_chunk_boundaries_do_not_change_the_events(data: bytes, cut: list[int]) -> None:
    tried("sse.Parser chunking")
    whole_events, whole_pending = feed_all([data])
    split_events, split_pending = feed_all(chunked(data, cut))
    assert shape(split_events) == shape(whole_events)
    assert split_pending == whole_pending
    byte_by_byte, pending = feed_all([data[i : i + 1] for i in range(len(data))])
    assert shape(byte_by_byte) == shape(whole_events) and pending == whole_pending


@fuzz(800)
@given(data=streams, cut=cuts)
def test_raw_bytes_of_the_events_and_pending_are_exactly_the_input(data: bytes, cut: list[int]) -> None:
    tried("sse.Parser raw concatenation")
    events, pending = feed_all(chunked(data, cut))
    assert b"".join(e.raw for e in events) + pending == data
    for event in events:
        assert event.raw.endswith((b"\n", b"\r"))
        for line in event.lines:
            assert line and "\n" not in line and "\r" not in line
        # the derived fields never fail, whatever the bytes were
        assert event.data is None or isinstance(event.data, str)
        assert event.id is None or isinstance(event.id, str)
        assert event.name is None or isinstance(event.name, str)


new_data = st.text(st.characters(exclude_characters="\r", exclude_categories=["Cs"]), max_size=40)


@fuzz(600)
@given(data=streams, replacement=new_data, cut=cuts)
def test_with_data_round_trips_through_the_parser(data: bytes, replacement: str, cut: list[int]) -> None:
    """``with_data`` keeps every other line and the event parses back with exactly the new data.
    (SSE data cannot hold a CR: the protocol treats it as a line end, so it is not generated.)"""
    tried("sse.Event.with_data round trip")
    for event in feed_all([data])[0]:
        encoded = event.with_data(replacement)
        again, pending = feed_all(chunked(encoded, cut))
        assert pending == b""
        assert len(again) == 1, encoded
        back = again[0]
        assert back.data == replacement
        assert back.id == event.id
        assert back.name == event.name
        others = [(n, v) for n, v in event.fields() if n != "data"]
        assert [(n, v) for n, v in back.fields() if n != "data"] == others


@fuzz(400)
@given(
    replacement=new_data,
    event=st.none() | st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=8),
    event_id=st.none() | st.text(st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=8),
)
def test_encode_round_trips(replacement: str, event: str | None, event_id: str | None) -> None:
    tried("sse.encode round trip")
    parsed, pending = feed_all([sse.encode(replacement, event=event, event_id=event_id)])
    assert pending == b"" and len(parsed) == 1
    # a leading space of a field value is the separator's, by the SSE rules: encode adds one
    assert parsed[0].data == replacement
    assert parsed[0].id == event_id
    assert parsed[0].name == event


@fuzz(800)
@given(data=streams, cut=cuts, limit=st.integers(1, 64))
def test_the_size_limit_raises_only_event_too_large_and_only_for_a_large_event(
    data: bytes, cut: list[int], limit: int
) -> None:
    tried("sse.Parser size limit")
    events, pending = feed_all([data])
    fits = all(len(e.raw) <= limit for e in events) and len(pending) <= limit
    try:
        feed_all(chunked(data, cut), max_event_bytes=limit)
    except sse.EventTooLarge as exc:
        assert str(exc)
        assert not fits, "an event within the limit was refused"


@fuzz(200)
@given(size=st.integers(2, 300), limit=st.integers(1, 64))
def test_an_endless_event_is_cut_off_at_the_limit(size: int, limit: int) -> None:
    """An upstream that never ends its event cannot make the gateway buffer without bound."""
    tried("sse.Parser endless event")
    parser = sse.Parser(max_event_bytes=limit)
    body = b"data: " + b"x" * size
    try:
        for i in range(len(body)):
            parser.feed(body[i : i + 1])
            assert len(parser.pending()) <= limit
    except sse.EventTooLarge:
        assert len(body) > limit
