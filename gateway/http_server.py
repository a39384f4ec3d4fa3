"""The gateway's HTTP/1.1 server: aiohttp's, with two hardenings it has no setting for.

1. **Parser errors never echo the request.** aiohttp answers a request its parser refuses with a 400
   whose body quotes the offending line (``Invalid header value char: b'Authorization: Bearer ap_…\\x00'``)
   and logs that line with a traceback on ``aiohttp.server`` at ERROR. A header line may hold an API
   key (a key file saved with Windows line endings leaves a bare CR after the key), so here the 400
   carries a fixed JSON body — ``{"error": {"code": "bad_request", "message": …, "hint": …}}`` — and
   one log line with the parser's *reason* only (a fixed phrase such as ``Invalid header value
   char``, kept only if it reads as one: a capitalised word, then lower-case words or protocol
   tokens, no quotes or digits), never the input.
2. **A deadline for request headers** (``client_header_timeout_s``, like nginx's
   ``client_header_timeout``): a new connection must deliver a complete request head within the
   deadline, and so must a kept-alive connection from the first byte of its next request. A client
   that trickles header bytes (slowloris) gets a 408 and the connection is closed; one that sent
   nothing is closed silently. A kept-alive connection that sends nothing stays governed by aiohttp's
   ``keepalive_timeout``; request *bodies* by ``client_body_timeout_s`` (``proxy._read_body``).

3. **No ``Server`` banner.** aiohttp names itself and its Python version in a ``Server`` header on
   every response; ``GatewayRequest`` removes it from every response this server sends (handlers',
   errors', parser refusals').

A request *body* that cannot be read — a ``Content-Encoding`` (gzip, deflate) that does not decode,
a body cut short — is a 400 too (``malformed_body_error``): the gateway's error middleware
(``app.canonical_log``) answers it on the gateway listener; anywhere else (the admin listener)
``handle_error`` answers with the fixed JSON body, never aiohttp's 500 and traceback. A body nobody
read (the request was refused first) that turns out not to decode while aiohttp drains it after the
response is logged at debug level, not as an unhandled exception.

``GatewayRunner`` is a drop-in ``web.AppRunner`` that builds this server; ``serve.run`` uses it for
the gateway and the admin listeners, and the test harness for its in-process gateway.
"""

from __future__ import annotations

import asyncio
import functools
import re
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.errors import BadRequest
from gateway.protocol import jsonrpc
from gateway.proxy.admission import ClientTooSlow

log = structlog.get_logger("gateway")

# The first line of a parser message, when it is a fixed phrase: llhttp's error reasons ("Invalid
# header value char", "Missing expected LF after header value"), aiohttp's own ("Too many headers
# received"). Input is always quoted (repr) or follows the phrase; requiring a capitalised word, then
# lower-case words or a few protocol tokens, and no digits or quotes keeps anything else out.
_SAFE_REASON = re.compile(
    r"[A-Z][a-z]+(?: (?:[a-z]+|HTTPS?|URL|CRLF|CR|LF|EOF|Content-Length|`Transfer-Encoding`|[A-Z]+/Upgrade))+"
)
_MALFORMED_HINT = (
    "Check the request line and headers: each header is 'Name: value' with no space before the colon, "
    "no line folding and no control characters (a key copied from a file with Windows line endings "
    "carries a stray carriage return), and Content-Length and Transfer-Encoding must not conflict"
)


def parser_reason(exc: HttpProcessingError) -> str | None:
    """The parser's reason for refusing a request, if it is a fixed phrase that quotes no input."""
    first = exc.message.split("\n", 1)[0].strip().removesuffix(":").removesuffix(".")
    return first if _SAFE_REASON.fullmatch(first) else None


def malformed_request_error(exc: HttpProcessingError) -> BadRequest:
    """The error a request aiohttp's parser refused is answered with: no byte of the input in it."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], int) else None
        size = f"the {limit} bytes" if limit is not None else "what"
        return BadRequest(
            f"Malformed HTTP request: the request line or a header is longer than {size} this gateway accepts",
            hint="Send a shorter URL or header (an API key belongs in the Authorization header)",
        )
    reason = parser_reason(exc)
    return BadRequest(f"Malformed HTTP request: {reason}" if reason else "Malformed HTTP request", hint=_MALFORMED_HINT)


_CODINGS = frozenset({"gzip", "deflate", "br", "zstd"})  # the codings aiohttp decodes


def malformed_body_error(request: web.BaseRequest, exc: web.RequestPayloadError) -> BadRequest:
    """The error a request whose body could not be read is answered with (aiohttp's body reader
    raises ``RequestPayloadError``, its parser's reason as the cause). The response must close the
    connection: what is left of the body cannot be told from a next request."""
    if isinstance(exc.__cause__, ContentEncodingError):
        coding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        return BadRequest(
            f"The request body is not valid {coding} data (Content-Encoding: {coding})"
            if coding in _CODINGS
            else "The request body does not decode as its Content-Encoding says",
            hint="Send the body uncompressed, or compressed with the coding Content-Encoding names",
        )
    return BadRequest(
        "The request body is malformed or incomplete",
        hint="Check the body's framing: its length must match Content-Length, or its chunks be well-formed",
    )


def _json_error(error: BadRequest | ClientTooSlow) -> bytes:
    return jsonrpc.dumps({"error": error.to_json()})


class GatewayRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol, with a fixed answer to parser errors and a header deadline."""

    __slots__ = ("_head_bytes", "_head_deadline", "_head_handle", "_header_timeout_s")

    def __init__(self, manager: web.Server, *, header_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout_s = header_timeout_s if header_timeout_s and header_timeout_s > 0 else None
        self._head_bytes = False  # bytes of a head not yet complete have arrived
        self._head_deadline = 0.0  # loop time by which the awaited head must be complete; 0: no clock
        self._head_handle: asyncio.TimerHandle | None = None

    # --- 1. parser errors ----------------------------------------------------------------------
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, web.RequestPayloadError):  # a body no handler's error mapping knew (the admin API)
            status = 400
            error = malformed_body_error(request, exc)
            log.info("request", status=status, error="malformed_body", reason=error.message)
        elif isinstance(exc, HttpProcessingError) and status < 500:
            error = malformed_request_error(exc)
            log.info("request", status=status, error="malformed_http", reason=error.message)
        else:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:  # as aiohttp: a response already started cannot be replaced
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        response = web.Response(status=status, body=_json_error(error), content_type="application/json")
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # After a response, aiohttp reads what is left of the request body to drain it; a body that
        # turns out not to decode there (a handler that answered without reading it, e.g. a 401) is
        # no fault of the gateway's and has no one left to answer: no ERROR and traceback for it.
        if isinstance(kwargs.get("exc_info"), web.RequestPayloadError):
            log.debug("request_body_unreadable", reason=type(kwargs["exc_info"].__cause__).__name__)
            return
        super().log_exception(*args, **kwargs)

    # --- 2. the header deadline ----------------------------------------------------------------
    # The clock runs from connection_made, or from the first byte that arrives while ``start()`` is
    # idle waiting for the next request (``_waiter`` set), until a complete head (or a parse error)
    # has been parsed. While it runs no request is being handled, so nothing else is writing.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._header_timeout_s is not None:
            self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        if self._header_timeout_s is None:
            super().data_received(data)
            return
        if data:
            if self._head_deadline == 0.0 and self._waiter is not None:
                self._start_head_clock()  # a kept-alive connection starts its next request
            self._head_bytes = True
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a complete head (or a parse error) arrived in time
            self._head_deadline = 0.0
            self._head_bytes = False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_handle is not None:
            self._head_handle.cancel()
            self._head_handle = None
        super().connection_lost(exc)

    def _start_head_clock(self) -> None:
        assert self._header_timeout_s is not None
        self._head_deadline = self._loop.time() + self._header_timeout_s
        if self._head_handle is None:  # else the pending check re-arms itself for the new deadline
            self._head_handle = self._loop.call_at(self._head_deadline, self._check_head)

    def _check_head(self) -> None:
        self._head_handle = None
        if self._head_deadline == 0.0 or self.transport is None or self._force_close:
            return
        if self._loop.time() < self._head_deadline:
            self._head_handle = self._loop.call_at(self._head_deadline, self._check_head)
            return
        if self._head_bytes:
            error = ClientTooSlow(
                f"The request headers did not arrive within {self._header_timeout_s:g}s",
                hint="Send the request line and headers promptly",
            )
            body = _json_error(error)
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )
            log.info("request", status=408, error="client_too_slow", reason="request headers too slow")
        self.force_close()  # transport.close() sends what was written, then closes


class GatewayRequest(web.Request):
    """aiohttp's request, whose responses carry no ``Server`` header (aiohttp's says
    ``Python/3.x aiohttp/3.y``: versions to look vulnerabilities up by). aiohttp sets it while
    preparing a response's headers, just before this hook; the apps' ``on_response_prepare``
    signals run after it, as ever."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        response.headers.popall(hdrs.SERVER, None)
        await super()._prepare_hook(response)


class GatewayServer(web.Server):
    """``web.Server`` whose connections are ``GatewayRequestHandler``s."""

    def __init__(self, handler: Any, *, header_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._header_timeout_s = header_timeout_s

    def __call__(self) -> RequestHandler:
        # No TypeError fallback as in aiohttp's: a bad option must fail loudly, not drop the limits.
        return GatewayRequestHandler(self, loop=self._loop, header_timeout_s=self._header_timeout_s, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` serving the app through ``GatewayServer``. ``header_timeout_s`` is the
    request-head deadline (``None``: only aiohttp's keep-alive timeout applies); other keyword
    arguments are aiohttp's (``access_log``, ``max_line_size``, ``handler_cancellation``, …)."""

    __slots__ = ("_header_timeout_s",)

    def __init__(self, app: web.Application, *, header_timeout_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app and gathers aiohttp's handler options
        return GatewayServer(
            plain.request_handler,
            request_factory=functools.partial(self.app._make_request, _cls=GatewayRequest),
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            header_timeout_s=self._header_timeout_s,
            **plain._kwargs,
        )
