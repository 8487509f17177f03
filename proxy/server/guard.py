"""Connection-level defences aiohttp does not give us by default.

aiohttp has no header-read deadline, no connection cap, and echoes a slice of a bad
header line (possibly a token) into its 400 body and its log. This module subclasses
its request handler to close those gaps. It relies on aiohttp internals, so the aiohttp
version is pinned exactly and tests cover each behaviour.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import http_exceptions, http_parser, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger("sluice.server")


def assert_c_parser() -> None:
    """The pure-Python parser carried most of aiohttp's smuggling CVEs: refuse to run on it."""
    parser = getattr(http_parser, "HttpRequestParserC", None)
    if parser is None or http_parser.HttpRequestParser is not parser:
        raise RuntimeError(
            "aiohttp's C HTTP parser is not in use (is AIOHTTP_NO_EXTENSIONS set?); "
            "Sluice refuses to run on the pure-Python parser"
        )


def error_body(error: str, reason: str, **extra: Any) -> bytes:
    return json.dumps({"error": error, "reason": reason, **extra}).encode()


def error_response(status: int, error: str, reason: str, **extra: Any) -> web.Response:
    return web.Response(
        status=status, body=error_body(error, reason, **extra), content_type="application/json"
    )


def _classify_parse_error(exc: BaseException | None) -> tuple[int, str, str]:
    """Status and a fixed reason: never the offending bytes, which may hold a token."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return 431, "headers_too_large", "a request header or the request line is too long"
    if isinstance(exc, http_exceptions.BadHttpMessage):
        text = str(exc)
        if "Too many headers" in text:
            return 431, "headers_too_large", "too many request headers"
        if "Content-Length" in text and "Transfer-Encoding" in text:
            return 400, "bad_request", "Content-Length and Transfer-Encoding together"
        if "Duplicate" in text:
            return 400, "bad_request", "a header that must appear once was repeated"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return 400, "bad_request", "not an HTTP request"
    return 400, "bad_request", "malformed HTTP request"


class GuardedRequestHandler(RequestHandler):
    """RequestHandler with a header deadline, a header byte cap and quiet error bodies."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future[None] | None = None
        #: Set on connections inside an intercepted CONNECT (see forward_connect).
        self.sluice_tunnel: Any = None
        self.sluice_on_lost: Any = None

    def gone(self) -> asyncio.Future[None]:
        """Completes when the client hangs up: aiohttp does not cancel the handler then, so
        a held request asks this before (and while) waiting."""
        if self._gone is None or self._gone.cancelled():
            self._gone = self._loop.create_future()
            if self.transport is None or self.transport.is_closing():
                self._gone.set_result(None)
        return self._gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard.open_connections += 1
        if self._guard.open_connections > self._guard.max_connections:
            log.warning("connection refused: %d connections open", self._guard.max_connections)
            self._reject(503, "too_many_connections", "the proxy is at its connection limit")
            return
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.open_connections -= 1
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
        self._cancel_header_timer()
        super().connection_lost(exc)
        if self.sluice_on_lost is not None:
            self.sluice_on_lost()

    def data_received(self, data: bytes) -> None:
        if not self._awaiting_headers:
            super().data_received(data)
            return
        self._header_bytes += len(data)
        super().data_received(data)
        if self._messages:
            self._headers_done()
        elif self._header_bytes > self._guard.max_header_bytes:
            self._reject(431, "headers_too_large", "request headers are too large")
        elif self._header_timer is None:
            # Armed only when headers arrive in pieces: a request whose headers came in
            # one read (nearly all of them) never pays for a timer.
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._guard.header_timeout, self._header_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_done(self) -> None:
        self._awaiting_headers = False
        self._cancel_header_timer()

    def _header_late(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self._messages:
            self._reject(408, "header_timeout", "request headers were not received in time")

    def _reject(self, status: int, error: str, reason: str) -> None:
        """Answer on the raw transport and close: the parser never sees a request."""
        self._awaiting_headers = False
        self._cancel_header_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        body = error_body(error, reason)
        head = (
            f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        self.force_close()
        transport.close()

    async def _handle_request(self, request: Any, start_time: Any, request_handler: Any) -> Any:
        self._headers_done()
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self._awaiting_headers = True
            self._header_bytes = 0

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status == 400:
            status, error, reason = _classify_parse_error(exc)
        elif status == 504:
            error, reason = "timeout", "the request timed out"
        else:
            error, reason = "internal_error", "Sluice failed to handle this request"
        log.warning(
            "%s from %s: %s (%s)",
            error,
            self._peer(),
            reason,
            type(exc).__name__ if exc else "no exception",
        )
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        response = error_response(status, error, reason)
        response.force_close()
        return response

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else "unknown"


_PHRASES = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class GuardedServer(Server):
    def __init__(
        self,
        handler: Any,
        *,
        header_timeout: float,
        max_header_bytes: int,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout = header_timeout
        self.max_header_bytes = max_header_bytes
        self.max_connections = max_connections
        self.open_connections = 0

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """AppRunner whose server is a GuardedServer; everything else is aiohttp's own."""

    def __init__(self, app: web.Application, *, guard: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._guard_options = guard

    async def _make_server(self) -> Server:
        loop = asyncio.get_running_loop()
        app = self.app
        app._set_loop(loop)
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        return GuardedServer(
            app._handle,
            request_factory=app._make_request,
            loop=loop,
            **self._guard_options,
            **self._kwargs,
        )


class _RedactParserErrors(logging.Filter):
    """aiohttp logs a slice of a bad header line with its tracebacks: keep only the type."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.getMessage()} ({type(record.exc_info[1]).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_redaction() -> None:
    for name in ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactParserErrors) for f in logger.filters):
            logger.addFilter(_RedactParserErrors())
