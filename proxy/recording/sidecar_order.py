"""Records accepted behind a body that is being stored as a sidecar blob wait for it.

The blob is written first (in the recorder's aux thread) so the record can name its
hash; whatever is accepted meanwhile queues behind it, and the file keeps the order
records were accepted in. Everything else goes straight to the chain, without a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.recording.errors import RecorderUnavailable

log = logging.getLogger("sluice.recording")

#: ``queue(kind, prepared fields, urgent, future)``: onto the chain, now.
Queue = Callable[[str, dict[str, Any], bool, "asyncio.Future[int] | None"], None]


class SidecarOrder:
    def __init__(
        self,
        queue: Queue,
        store: Callable[[bytes], Awaitable[dict[str, Any]]],
        ensure_ok: Callable[[], None],
    ) -> None:
        self._queue = queue
        self._store = store
        self._ensure_ok = ensure_ok
        self._tail: asyncio.Future[int] | None = None  # the last record held back
        self._background: set[asyncio.Future[int]] = set()

    @property
    def holding(self) -> bool:
        return self._tail is not None and not self._tail.done()

    def later(
        self,
        kind: str,
        prepared: dict[str, Any],
        big: bytes | None,
        urgent: bool,
        future: asyncio.Future[int] | None,
    ) -> None:
        """Queue after the blob ``big`` (if any) and everything held back before it."""
        later = asyncio.ensure_future(self._after(self._tail, kind, prepared, big, urgent))
        self._tail = later
        if future is not None:
            later.add_done_callback(lambda done: _settle(future, done))
        else:
            self._background.add(later)
            later.add_done_callback(self._background_done)

    async def wait(self) -> None:
        """Until nothing is held back."""
        while self._tail is not None and not self._tail.done():
            await asyncio.wait([self._tail])

    async def _after(
        self,
        tail: asyncio.Future[int] | None,
        kind: str,
        prepared: dict[str, Any],
        big: bytes | None,
        urgent: bool,
    ) -> int:
        if tail is not None:
            await asyncio.wait([tail])
        if big is not None:
            self._ensure_ok()
            prepared["body"] = await self._store(big)
        self._ensure_ok()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue(kind, prepared, urgent, future)
        return await future

    def _background_done(self, done: asyncio.Future[int]) -> None:
        self._background.discard(done)
        if done.cancelled() or (error := done.exception()) is None:
            return
        reason = str(error) if isinstance(error, RecorderUnavailable) else type(error).__name__
        log.warning("a background record was not written: %s", reason)


def _settle(future: asyncio.Future[int], done: asyncio.Future[int]) -> None:
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif (error := done.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(done.result())
