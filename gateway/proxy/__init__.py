"""The MCP reverse-proxy handler: authenticate → price → hold → forward → relay → capture/void.

The gateway owns the ids it sends upstream (``gateway.protocol.upstream_ids``): every forwarded request gets
a gateway-unique id and its response gets the client's id back, so a response settles only the
call whose request produced it. Responses are otherwise relayed untouched unless they answer a held
call (a receipt is added to the result's ``_meta``) or a list whose items have prices
(``io.agentpay/price`` in each item's ``_meta``). SSE is relayed event by event. A held call is
captured only after the response carrying its success was written to the client; anything else
voids it, except that a call of a session whose client went away stays held until its response
arrives on a later stream of the session (or the resume window ends), and a task-augmented call
stays held until its task's result is delivered or the upstream confirms it failed or was
cancelled. A priced result the gateway can no longer bill is withheld, never delivered free.
"""

from gateway.proxy.exchange import DEADLINES, LOG_FIELDS, PAYMENT_META, PRICE_META, RECEIPT_META, ROUTER, UPSTREAMS
from gateway.proxy.handler import handle

__all__ = ["DEADLINES", "LOG_FIELDS", "PAYMENT_META", "PRICE_META", "RECEIPT_META", "ROUTER", "UPSTREAMS", "handle"]
