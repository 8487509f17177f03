"""Brings a recorder back after the disk does.

The proxy refuses every request while it cannot record, so a transient fault (a full disk
someone cleans up, a remount) must not need a restart: this retries ``open()`` (a recorder
that never started) or ``recover()`` (one that failed while running) with a growing delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from proxy.recording.errors import RecorderUnavailable
from proxy.recording.writer import Recorder

log = logging.getLogger("sluice.recording")


class RecorderSupervisor:
    def __init__(self, recorder: Recorder, *, first_delay: float = 5.0, max_delay: float = 60.0):
        self.recorder = recorder
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.attempts = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._opened = False

    async def start(self) -> None:
        """Open now; on failure the proxy runs (refusing) and the retries begin."""
        await self._try()
        self._task = asyncio.get_running_loop().create_task(self._watch())
        self.recorder.on_state_change(self._changed)

    def _changed(self, state: str, _reason: str | None) -> None:
        if state == "failed":
            self._wake.set()

    async def _try(self) -> bool:
        recorder = self.recorder
        try:
            if not self._opened:
                await recorder.open()
                self._opened = True
            elif recorder.state == "failed":
                await recorder.recover()
        except RecorderUnavailable as exc:
            self.attempts += 1
            log.error("the recorder is unavailable (attempt %d): %s", self.attempts, exc)
            return False
        return recorder.state == "ok"

    async def _watch(self) -> None:
        while True:
            if self._opened and self.recorder.state == "ok":
                self._wake.clear()
                await self._wake.wait()
            delay = self.first_delay
            while not await self._sleep_then_try(delay):
                delay = min(delay * 2, self.max_delay)

    async def _sleep_then_try(self, delay: float) -> bool:
        await asyncio.sleep(delay)
        if self._opened and self.recorder.state == "closed":  # closing: stop trying
            return True
        return await self._try()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
