"""The ids the gateway sends upstream carry the client's id exactly and nothing a client can forge."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.ids import TimeOrderedIds
from gateway.protocol.upstream_ids import decode, mint, owner_tag

client_ids = st.one_of(st.integers(min_value=-(2**80), max_value=2**80), st.text(max_size=64))


@given(client_ids, st.booleans())
def test_every_client_id_round_trips_exactly_with_its_kind(client_id: int | str, priced: bool) -> None:
    upstream_id = mint(TimeOrderedIds().next(), client_id, priced=priced, owner=owner_tag("k1"))
    decoded = decode(upstream_id)
    assert decoded is not None
    assert decoded.client_id == client_id and type(decoded.client_id) is type(client_id)
    assert decoded.priced is priced


def test_ids_above_two_to_the_53_reach_the_upstream_as_strings() -> None:
    upstream_id = mint(TimeOrderedIds().next(), 2**53 + 1, priced=True, owner=owner_tag("k1"))
    assert isinstance(upstream_id, str)
    decoded = decode(upstream_id)
    assert decoded is not None and decoded.client_id == 2**53 + 1


def test_two_requests_with_the_same_client_id_get_different_upstream_ids() -> None:
    ids, owner = TimeOrderedIds(), owner_tag("k1")
    assert mint(ids.next(), 777, priced=True, owner=owner) != mint(ids.next(), 777, priced=True, owner=owner)


@given(st.one_of(st.text(max_size=40), st.integers(), st.none(), st.booleans(), st.floats()))
def test_decoding_anything_else_never_raises_and_finds_nothing_unless_minted(value: object) -> None:
    decoded = decode(value)
    if decoded is not None:
        assert isinstance(value, str) and value.startswith("ap.")


def test_a_malformed_gateway_like_id_is_not_ours() -> None:
    for value in ("ap.", "ap.x1.n1", "ap.p1", "ap.p1.n1x", "ap.p1.q1", "ap.p1.n", "ap.p1.n٣"):
        assert decode(value) is None


def test_the_key_that_sent_a_request_is_named_in_its_upstream_id() -> None:
    nonce = TimeOrderedIds().next()
    alice, mallory = owner_tag("key-alice"), owner_tag("key-mallory")
    assert alice != mallory
    decoded = decode(mint(nonce, "x-1.2", priced=False, owner=alice))
    assert decoded is not None and decoded.owner == alice and decoded.client_id == "x-1.2"
