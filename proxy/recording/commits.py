"""Group commit: lines queued on the event loop, written and fsynced in batches.

Whatever is queued while a batch is on its way to the disk goes in the next one, so
concurrent requests share fsyncs. Lines nobody waits for (responses, notes) wait up to
``LAZY_DELAY`` for an urgent one to start a batch: one fsync per request instead of two
when requests come one at a time. The recorder decides what a failure means; this only
moves lines and says which are durable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from proxy.recording.disk import Disk
from proxy.recording.disk_thread import DiskThread
from proxy.recording.recovery import Position

#: How long a non-urgent line waits for an urgent one to share its fsync.
LAZY_DELAY = 0.02


@dataclass(slots=True)
class Item:
    pos: Position  # the chain after this line
    line: bytes
    future: asyncio.Future[int] | None  # given the line's seq once it is durable


class GroupCommit:
    def __init__(
        self,
        disk: Disk,
        thread: DiskThread,
        *,
        writable: Callable[[], bool],
        durable: Callable[[list[Item]], None],
        failed: Callable[[BaseException | None, list[Item]], None],
    ) -> None:
        """``durable(batch)`` after a batch is on disk (its futures are then resolved);
        ``failed(error, batch)`` when writing it raised, or with ``None`` when a batch
        was due while ``writable()`` said no. Either way ``failed`` must fail the futures
        of the batch and of everything still queued (``take_queued``)."""
        self.disk = disk
        self.thread = thread
        self._writable = writable
        self._durable = durable
        self._failed = failed
        self.queued: list[Item] = []
        self._writing: list[Item] | None = None  # the batch the disk thread has
        self._idle: list[asyncio.Future[None]] = []
        self._flushes: list[tuple[int, asyncio.Future[None]]] = []
        self._lazy: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return self._writing is not None or bool(self.queued)

    def add(self, item: Item) -> None:
        """Queue a line; ``kick`` (now) or ``soon`` (lazily) sends it."""
        self.queued.append(item)

    def soon(self) -> None:
        if self._lazy is None:  # one timer at a time, left to run out: cheaper than a
            # timer per record, each cancelled by the next urgent one
            self._lazy = asyncio.get_running_loop().call_later(LAZY_DELAY, self._lazy_due)

    def kick(self) -> None:
        """Send what is queued, unless a batch is already on its way (it follows that one)."""
        if self._writing is not None or not self.queued:
            return
        if not self._writable():
            self._failed(None, [])
            return
        batch, self.queued = self.queued, []
        self._writing = batch
        self.thread.post(self.disk.write_batch, batch, self._written)

    def take_queued(self) -> list[Item]:
        """Everything queued and not yet sent (the caller fails it)."""
        queued, self.queued = self.queued, []
        return queued

    async def drain(self) -> None:
        """Until the disk thread holds no batch and nothing is queued for it."""
        self.kick()
        if self._writing is not None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter

    async def flush_to(self, seq: int) -> None:
        """Until line ``seq`` is durable or writing has failed (never raises)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._flushes.append((seq, waiter))
        self.kick()
        await waiter

    def wake_flushes(self, durable_seq: int, failed: bool) -> None:
        waiting = []
        for seq, waiter in self._flushes:
            if failed or seq <= durable_seq:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((seq, waiter))
        self._flushes = waiting

    def stop(self) -> None:
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None
        self.thread.stop()

    def _lazy_due(self) -> None:
        self._lazy = None
        self.kick()

    def _written(self, _result: None, error: BaseException | None) -> None:
        batch, self._writing = self._writing or [], None
        if error is not None:
            self._failed(error, batch)
        else:
            self._durable(batch)
            for item in batch:
                if item.future is not None and not item.future.done():
                    item.future.set_result(item.pos.seq)
            self.wake_flushes(batch[-1].pos.seq, failed=False)
            self.kick()
        if self._writing is None:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
