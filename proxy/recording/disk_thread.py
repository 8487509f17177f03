"""The recorder's one I/O thread: file work in order, answered on the event loop.

A group commit is one queue put and one loop wake-up. An executor costs a
``concurrent.futures.Future``, an asyncio wrapper, a task to await it and a chain of
callbacks for each commit, and with one commit per request at low concurrency that was
most of what recording cost the event loop (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any

#: ``done(result, error)``, called on the event loop once ``fn(arg)`` has run.
Done = Callable[[Any, BaseException | None], None]


class DiskThread:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._jobs: queue.SimpleQueue[tuple[Callable[[Any], Any], Any, Done] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def post(self, fn: Callable[[Any], Any], arg: Any, done: Done) -> None:
        """Run ``fn(arg)`` after every job posted before it; ``done`` runs on the loop."""
        self._jobs.put((fn, arg, done))

    def call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``fn(*args)`` in the thread, in order with commits, as an awaitable."""
        future: asyncio.Future[Any] = self._loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        self.post(lambda call_args: fn(*call_args), args, done)
        return future

    def stop(self) -> None:
        """Finish what was posted, then end the thread."""
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, arg, done = job
            try:
                result, error = fn(arg), None
            except BaseException as exc:  # handed to the loop, which decides what it means
                result, error = None, exc
            try:
                self._loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return
