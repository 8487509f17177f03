"""Timer-driven recorder work: seal idle records, and apply retention off the event loop.

A checkpoint is written every ``checkpoint_seconds`` while records are unsealed, so a
quiet session is not left unsigned. Retention runs at open, after each rotation, and
periodically; its deletions are themselves recorded (``recorder.retention``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Protocol

from proxy.recording.errors import safe_reason
from proxy.recording.storage import apply_retention

log = logging.getLogger("sluice.recording")


class Sealable(Protocol):
    def seal_if_idle(self, now: float) -> None: ...

    def note_retention(self, deleted: list[str]) -> None: ...


class Housekeeper:
    def __init__(
        self,
        owner: Sealable,
        directory: Path,
        *,
        checkpoint_seconds: float,
        retention_seconds: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.owner = owner
        self.directory = directory
        self.retention_seconds = retention_seconds
        self.interval = max(0.01, min(1.0, checkpoint_seconds / 4))
        self.retention_every = min(3600.0, (retention_seconds or 0) / 2)
        self.clock = clock
        self._ticker: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self._last_retention = 0.0

    def start(self, executor: Executor, current: Callable[[], Path]) -> None:
        self._executor, self._current = executor, current
        self._ticker = asyncio.get_running_loop().create_task(self._tick())
        self.schedule_retention()

    async def stop(self) -> None:
        """Stop the timer; let a retention pass that already started finish."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._retention is not None:
            with contextlib.suppress(Exception):
                await self._retention
        self._ticker = self._retention = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            now = self.clock()
            self.owner.seal_if_idle(now)
            if self.retention_seconds and now - self._last_retention >= self.retention_every:
                self.schedule_retention()

    def schedule_retention(self) -> None:
        if not self.retention_seconds or self._ticker is None:
            return
        if self._retention is None or self._retention.done():
            self._retention = asyncio.get_running_loop().create_task(self._apply())

    async def _apply(self) -> None:
        assert self.retention_seconds is not None
        now = self._last_retention = self.clock()
        loop = asyncio.get_running_loop()
        try:
            deleted = await loop.run_in_executor(
                self._executor,
                apply_retention,
                self.directory,
                now,
                self.retention_seconds,
                self._current(),
            )
        except OSError as exc:
            log.warning("recording retention failed: %s", safe_reason(exc))
            return
        if deleted:
            self.owner.note_retention(deleted)
