"""The main listener's front door: ``CONNECT`` is answered here, everything else is handed
to aiohttp's (guarded) request handler on the same socket.

aiohttp has no way to take over a socket after a CONNECT, so this plain asyncio protocol
reads the first request head itself. A ``CONNECT`` head is parsed here (bounded in size
and time) and given to ``ConnectHandler``; any other request, absolute-form proxy
requests included, goes to aiohttp with the bytes read so far.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.server.guard import GuardedServer, error_body

log = logging.getLogger("sluice.forward")
_CONNECT = b"CONNECT "
_PHRASES = {
    200: "Connection Established",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
#: Bytes an agent may send while its CONNECT is being decided (it should send none).
MAX_EARLY = 64 * 1024


class HeadError(ValueError):
    pass


@dataclass
class ConnectHead:
    """A parsed CONNECT request head. ``headers`` keeps names as sent."""

    authority: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        for key, value in self.headers:
            if key.lower() == wanted:
                return value
        return None


def parse_connect_head(data: bytes) -> ConnectHead:
    """Strict: one request line, ``name: value`` lines, no body, no repeated auth."""
    try:
        text = data.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise HeadError("undecodable request head") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[0] != "CONNECT" or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise HeadError("malformed CONNECT request line")
    head = ConnectHead(parts[1])
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t\r\n"):
            raise HeadError("malformed header line")
        if any(ord(c) < 32 and c != "\t" for c in value):
            raise HeadError("control characters in a header")
        head.headers.append((name, value.strip()))
    names = [name.lower() for name, _ in head.headers]
    for once in ("proxy-authorization", "host", "content-length"):
        if names.count(once) > 1:
            raise HeadError(f"repeated {once} header")
    if "transfer-encoding" in names or (head.get("Content-Length") or "0") != "0":
        raise HeadError("a CONNECT request has no body")
    return head


def raw_answer(
    status: int, body: bytes, headers: list[tuple[str, str]] | None = None, *, close: bool = True
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}"]
    if status != 200:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        if close:
            lines.append("Connection: close")
    lines += [f"{name}: {value}" for name, value in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body if status != 200 else b"")


class ForwardFront(asyncio.Protocol):
    """One agent connection until it is known whether it is a CONNECT."""

    def __init__(
        self,
        on_connect: Callable[[ForwardFront, ConnectHead], asyncio.Task[None]],
        plain: GuardedServer,
        *,
        header_timeout: float,
        max_header_bytes: int,
    ) -> None:
        self._on_connect = on_connect
        self._plain = plain
        self._header_timeout = header_timeout
        self._max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = "head"  # head -> connect -> (tls | pipe | closed)
        self._timer: asyncio.TimerHandle | None = None
        self._gone: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()
        # One connection cap for the listener: counted here until aiohttp takes over (it
        # counts for itself) or the CONNECT it carried is over (release()).
        self._counted = True
        self._plain.open_connections += 1
        if self._plain.open_connections > self._plain.max_connections:
            log.warning("connection refused: %d connections open", self._plain.max_connections)
            self.refuse(503, "too_many_connections", "the proxy is at its connection limit")
            return
        self._timer = loop.call_later(self._header_timeout, self._late)

    def release(self) -> None:
        if self._counted:
            self._counted = False
            self._plain.open_connections -= 1

    def gone(self) -> asyncio.Future[None]:
        """Completes when the agent hangs up (a held CONNECT watches it)."""
        assert self._gone is not None
        return self._gone

    def data_received(self, data: bytes) -> None:
        if self.state == "head":
            self.buffer += data
            start = bytes(self.buffer[: len(_CONNECT)])
            if not _CONNECT.startswith(start):
                self._hand_to_aiohttp()
            elif len(start) == len(_CONNECT):
                self._read_connect_head()
        elif self.state in ("connect", "tls"):
            self.buffer += data  # given to the next protocol, or refused if too much
            if len(self.buffer) > MAX_EARLY:
                self.refuse(400, "bad_request", "too much data before the tunnel was open")

    def _hand_to_aiohttp(self) -> None:
        self._cancel_timer()
        assert self.transport is not None
        self.state = "aiohttp"
        self.release()
        handler = self._plain()
        self.transport.set_protocol(handler)
        handler.connection_made(self.transport)
        data, self.buffer = bytes(self.buffer), bytearray()
        handler.data_received(data)

    def _read_connect_head(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > self._max_header_bytes:
                self.refuse(431, "headers_too_large", "request headers are too large")
            return
        if end > self._max_header_bytes:
            self.refuse(431, "headers_too_large", "request headers are too large")
            return
        self._cancel_timer()
        head_bytes = bytes(self.buffer[:end])
        del self.buffer[: end + 4]
        try:
            head = parse_connect_head(head_bytes)
        except HeadError as exc:
            self.refuse(400, "bad_request", str(exc))
            return
        self.state = "connect"
        self.task = self._on_connect(self, head)

    def _late(self) -> None:
        self._timer = None
        if self.state == "head":
            self.refuse(408, "header_timeout", "request headers were not received in time")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def refuse(
        self,
        status: int,
        error: str,
        reason: str,
        headers: list[tuple[str, str]] | None = None,
        **extra: object,
    ) -> bytes:
        """Answer with Sluice's JSON and close; returns the body the agent was sent."""
        self._cancel_timer()
        self.state = "closed"
        body = error_body(error, reason, **extra)
        if self.transport is None or self.transport.is_closing():
            return b""
        data = raw_answer(status, body, headers)
        self.transport.write(data)
        self.transport.close()
        return body

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.release()
        if self.state in ("head", "connect"):
            self.state = "closed"
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)
