"""Per-process session state stays bounded per key and per session, and what it holds is released
the way the money needs: a closed channel takes no more calls, a polled task keeps its hold."""

from __future__ import annotations

from gateway.protocol.sessions import Call, Forwarded, LegacyChannel, Sessions


def held_call(n: int) -> Call:
    call = Call(f"call-{n}", n, "weather", "tool", "get_forecast", 5_000, 0)
    call.upstream_id = f"ap.p{n:032x}-abc.n{n}"
    return call


def test_a_closed_legacy_channel_expects_no_more_requests() -> None:
    channel = LegacyChannel("key-alice", "weather", "http://127.0.0.1:1/messages")
    assert channel.expect("ap.p1-a.n1", Forwarded(1, "tools/call", held_call(1)))
    channel.closed = True
    assert not channel.expect("ap.p2-a.n2", Forwarded(2, "tools/call", held_call(2)))
    assert list(channel.pending) == ["ap.p1-a.n1"]


def test_one_key_with_many_tasks_evicts_only_its_own_oldest() -> None:
    sessions = Sessions(window_s=300)
    assert sessions.bind_task("key-bob", "bob-task", held_call(0))
    for n in range(10_001):
        sessions.bind_task("key-mallory", f"m-{n}", None)
    assert sessions.task_of("key-bob", "bob-task") is not None
    assert sessions.task_of("key-mallory", "m-0") is None  # mallory's oldest went
    assert sessions.task_of("key-mallory", "m-10000") is not None


def test_a_session_parks_at_most_a_thousand_calls() -> None:
    sessions = Sessions(window_s=300)
    parked = [sessions.park("S1", Forwarded(n, "tools/call", held_call(n))) for n in range(1_001)]
    assert parked.count(True) == 1_000 and parked[-1] is False  # the caller voids the rest
    assert sessions.park("S2", Forwarded(5_000, "tools/call", held_call(5_000)))


def test_a_task_its_owner_polls_keeps_its_hold_past_the_window() -> None:
    clock = [0.0]
    sessions = Sessions(window_s=300, clock=lambda: clock[0])
    call = held_call(1)
    assert sessions.bind_task("key-alice", "t-1", call)
    clock[0] = 250.0
    sessions.touch_task("t-1")  # tasks/get or tasks/result by its owner
    clock[0] = 500.0
    assert sessions.expired() == []
    clock[0] = 551.0
    assert sessions.expired() == [call]


def test_calls_are_parked_for_at_most_a_hundred_thousand_sessions_and_the_next_is_refused() -> None:
    sessions = Sessions(window_s=300)
    for n in range(100_000):
        assert sessions.park(f"S{n}", Forwarded(n, "tools/call", held_call(n)))
    assert not sessions.park("one-too-many", Forwarded(0, "tools/call", held_call(100_000)))  # the caller voids it
    assert sessions.park("S7", Forwarded(7_777, "tools/call", held_call(7_777)))  # a known session still parks


def test_the_task_table_forgets_its_oldest_binding_past_a_hundred_thousand_tasks() -> None:
    sessions = Sessions(window_s=300)
    for n in range(100_001):
        assert sessions.bind_task(f"key-{n % 50}", f"t-{n}", None)
    assert sessions.task_of("key-0", "t-0") is None  # the oldest went: unknown fails closed
    assert sessions.task_of("key-1", "t-1") is not None
    assert sessions.task_of("key-0", "t-100000") is not None


def test_request_ids_in_flight_are_tracked_up_to_their_bound_and_no_further() -> None:
    sessions = Sessions(window_s=300)
    for n in range(400_001):
        sessions.track("scope", n, f"up-{n}")
    assert sessions.upstream_id_of("scope", 399_999) == "up-399999"
    assert sessions.upstream_id_of("scope", 400_000) is None  # past the bound: a cancel finds nothing
    sessions.untrack("scope", 0, "up-0")
    sessions.track("scope", 400_000, "up-400000")
    assert sessions.upstream_id_of("scope", 400_000) == "up-400000"
