"""What the gateway accepts as a JSON-RPC message: a request, a notification or a response, and
nothing else (an id alone could be answered by a lenient upstream for an id the client chose)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.errors import INVALID_REQUEST, BadRequest, HeaderMismatch
from gateway.protocol.jsonrpc import check_routing_headers, dumps, parse_body

PRICED = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "get_forecast"}}


@pytest.mark.parametrize(
    "decoy",
    [
        {"jsonrpc": "2.0", "id": 1},
        {"jsonrpc": "2.0", "id": 1, "result": {}, "error": {"code": 1, "message": "x"}},
        {"jsonrpc": "2.0", "result": {}},
        {"jsonrpc": "2.0"},
    ],
)
def test_a_batch_item_that_is_no_request_notification_or_response_refuses_the_batch(decoy: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_body(dumps([decoy, PRICED]), max_batch_items=10)
    assert caught.value.jsonrpc_code == INVALID_REQUEST
    with pytest.raises(BadRequest):
        parse_body(dumps(decoy), max_batch_items=10)


@pytest.mark.parametrize(
    "answer",
    [
        {"jsonrpc": "2.0", "id": 1, "result": {}},
        {"jsonrpc": "2.0", "id": 1, "error": {"code": -1, "message": "no"}},
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "unparsable"}},
    ],
)
def test_a_response_to_a_server_request_is_accepted_beside_a_request_with_the_same_id(answer: dict[str, Any]) -> None:
    incoming = parse_body(dumps([answer, PRICED]), max_batch_items=10)
    assert [m.is_response for m in incoming.messages] == [True, False]


def test_mcp_name_is_checked_even_without_mcp_method() -> None:
    incoming = parse_body(dumps(PRICED), max_batch_items=10)
    with pytest.raises(HeaderMismatch):
        check_routing_headers(incoming, None, "something_else")
    check_routing_headers(incoming, None, "get_forecast")
