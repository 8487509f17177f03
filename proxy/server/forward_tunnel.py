"""An opaque tunnel: bytes both ways between the agent and a checked address.

Sluice sees no request inside a passthrough tunnel, only the destination (decided before
connecting) and how many bytes went each way, which the flow and the recording keep.
Flow control follows the slower side; a tunnel quiet for ``idle_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class _Side(asyncio.Protocol):
    def __init__(self, pipe: Pipe, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pipe.carry(self, data)

    def eof_received(self) -> bool:
        self.pipe.half_close(self)
        return True  # keep our write side open until the other side finishes

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.lost(self)

    def pause_writing(self) -> None:
        other = self.pipe.other(self).transport
        if other is not None and not other.is_closing():
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.pipe.other(self).transport
        if other is not None and not other.is_closing():
            other.resume_reading()


class Pipe:
    """Two transports joined; ``done`` completes once both are closed."""

    def __init__(self, idle_timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.client = _Side(self, "client")
        self.upstream = _Side(self, "upstream")
        self.up = 0  # agent to destination
        self.down = 0  # destination to agent
        self.done: asyncio.Future[None] = loop.create_future()
        self._early: list[bytes] = []  # from the destination before the agent is attached
        self._attached = False
        self._eofs: set[str] = set()
        self._idle = idle_timeout
        self._last = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def other(self, side: _Side) -> _Side:
        return self.upstream if side is self.client else self.client

    def attach_client(self, transport: asyncio.Transport) -> None:
        """The agent's side, once it has been told the tunnel is open."""
        self.client.transport = transport
        transport.set_protocol(self.client)
        self._attached = True
        for chunk in self._early:
            self.carry(self.upstream, chunk)
        self._early.clear()
        self._timer = asyncio.get_running_loop().call_later(self._idle, self._check_idle)

    def carry(self, side: _Side, data: bytes) -> None:
        self._last = time.monotonic()
        if side is self.upstream and not self._attached:
            self._early.append(data)
            return
        target = self.other(side).transport
        if target is None or target.is_closing():
            return
        if side is self.client:
            self.up += len(data)
        else:
            self.down += len(data)
        target.write(data)

    def half_close(self, side: _Side) -> None:
        self._eofs.add(side.name)
        target = self.other(side).transport
        if target is not None and not target.is_closing() and target.can_write_eof():
            target.write_eof()
        if len(self._eofs) == 2:
            self.close()

    def lost(self, side: _Side) -> None:
        other = self.other(side).transport
        if other is not None and not other.is_closing():
            other.close()
        if side.name == "upstream" and not self._attached:
            return
        sides = (self.client, self.upstream)
        if all(s.transport is None or s.transport.is_closing() for s in sides):
            self._finish()

    def _check_idle(self) -> None:
        quiet = time.monotonic() - self._last
        if quiet >= self._idle:
            self.close()
            return
        self._timer = asyncio.get_running_loop().call_later(self._idle - quiet, self._check_idle)

    def close(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.close()
        self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.done.done():
            self.done.set_result(None)

    def abort(self) -> None:
        for side in (self.client, self.upstream):
            if side.transport is not None:
                with contextlib.suppress(Exception):
                    side.transport.abort()
        self._finish()
