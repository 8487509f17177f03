"""The session recorder: durable, chained, signed, and fail-closed.

``await recorder.append(kind, **fields)`` returns a record's ``seq`` only once the record
is on disk (written and fsynced). Appenders that arrive while an fsync runs are written
and fsynced together next (group commit), in one dedicated thread, so the event loop
never blocks on the disk and throughput does not collapse to one fsync per request.

Any write error (ENOSPC, EROFS, EIO, a closed file) puts the recorder in the ``failed``
state: every append raises ``RecorderUnavailable`` until ``recover()`` succeeds, because a
gateway that cannot record must stop serving (Teleport, Vault). ``recover()`` cuts the
current file back to the last fsynced record (keeping a ``.broken`` copy): what callers
were told failed is exactly what is gone.

What fields are redacted and how bodies are kept: ``proxy.recording.prepare``. How lines
are batched: ``proxy.recording.commits``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from proxy.recording import format as fmt
from proxy.recording.chain import next_file, next_line, rotation_due
from proxy.recording.commits import GroupCommit, Item
from proxy.recording.disk import Disk
from proxy.recording.disk_thread import DiskThread
from proxy.recording.errors import RecorderUnavailable, RecordingCorrupt, safe_reason
from proxy.recording.files import BLOBS_DIR, UnsafePath, file_name, write_all
from proxy.recording.housekeeping import Housekeeper
from proxy.recording.keys import KeyFileError, Signer
from proxy.recording.prepare import FieldPreparer
from proxy.recording.recovery import Position, file_intro, open_directory
from proxy.recording.sidecar_order import SidecarOrder
from proxy.recording.storage import store_blob
from proxy.state import StateError

log = logging.getLogger("sluice.recording")

State = Literal["closed", "ok", "failed"]
StateCallback = Callable[[str, str | None], None]


def _write(fd: int, data: bytes) -> None:
    """The one place records reach the disk (tests inject errors here)."""
    write_all(fd, data)


@dataclass
class RecorderStats:
    records: int = 0
    batches: int = 0


class Recorder:
    def __init__(
        self,
        directory: Path | str,
        signing_key_path: Path | str,
        *,
        rotate_bytes: int = 64 * 1024 * 1024,
        rotate_seconds: float = 86400.0,
        retention_seconds: float | None = 30 * 86400.0,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 30.0,
        max_inline_body: int = 256 * 1024,
        oversize: Literal["sidecar", "truncate"] = "sidecar",
        redact_headers: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if oversize not in ("sidecar", "truncate"):
            raise ValueError('oversize must be "sidecar" or "truncate"')
        if rotate_bytes <= 0 or checkpoint_every <= 0 or max_inline_body < 0:
            raise ValueError("rotate_bytes and checkpoint_every must be positive")
        self.directory = Path(directory)
        self.blobs = self.directory / BLOBS_DIR
        self.signing_key_path = Path(signing_key_path)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.retention_seconds = retention_seconds
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = checkpoint_seconds
        self.max_inline_body = max_inline_body
        self.oversize = oversize
        self._fields = FieldPreparer(
            redact_headers=redact_headers, max_inline_body=max_inline_body, oversize=oversize
        )
        self._clock = clock
        self.stats = RecorderStats()
        self.problems: list[RecordingCorrupt] = []
        self.failure: str | None = None
        self._state: State = "closed"
        self._reported: State = "closed"
        self._callbacks: list[StateCallback] = []
        self._signer: Signer | None = None
        self._pos: Position | None = None
        self._durable: Position | None = None
        self._intro: tuple[str, dict[str, Any]] | None = None
        self._commits: GroupCommit | None = None
        self._sidecars = SidecarOrder(self._queue, self._store, self._ensure_ok)
        self._housekeeper = Housekeeper(
            self,
            self.directory,
            checkpoint_seconds=checkpoint_seconds,
            retention_seconds=retention_seconds,
            clock=clock,
        )
        self._aux: ThreadPoolExecutor | None = None
        self._disk = Disk(self.directory, lambda fd, data: _write(fd, data))

    # ------------------------------------------------------------------ public API

    @property
    def state(self) -> State:
        """``failed`` too for a recorder that could not open (``failure`` says why)."""
        if self._state == "closed" and self.failure is not None:
            return "failed"
        return self._state

    @property
    def current_file(self) -> Path | None:
        return self._pos.path if self._pos else None

    @property
    def last_seq(self) -> int:
        return self._durable.seq if self._durable else 0

    @property
    def key_id(self) -> str | None:
        return self._signer.key_id if self._signer else None

    def on_state_change(self, callback: StateCallback) -> None:
        """``callback(state, reason)`` with ``"ok"``/``"failed"``/``"closed"`` on each change."""
        self._callbacks.append(callback)

    async def __aenter__(self) -> Recorder:
        await self.open()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create or repair the directory, then resume; durable before it returns."""
        if self._state != "closed":
            raise RuntimeError("recorder is already open")
        thread = DiskThread(asyncio.get_running_loop(), "sluice-recorder")
        self._commits = GroupCommit(
            self._disk,
            thread,
            writable=lambda: self._state == "ok",
            durable=self._durable_batch,
            failed=self._write_failed,
        )
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="sluice-recorder-aux")
        try:
            self._signer, plan = await thread.call(
                open_directory, self.directory, self.signing_key_path, self._clock()
            )
        except Exception as exc:
            self._shutdown_executors()
            known = isinstance(exc, UnsafePath | StateError | KeyFileError)
            reason = str(exc) if known else safe_reason(exc)
            self.failure = f"cannot open the recordings: {reason}"
            self._report("failed", self.failure)
            raise RecorderUnavailable(self.failure) from None
        self.failure = None
        self.problems = plan.problems
        self._pos = self._durable = plan.position
        self._state = "ok"
        future = self._enqueue_intro(plan.intro)
        self._commits.kick()
        self._housekeeper.start(self._aux, lambda: self._pos.path if self._pos else self.directory)
        await future  # a failure here leaves the recorder open and failed: recover() or close()
        self._report("ok", None)

    async def append(self, kind: str, *, urgent: bool = True, **fields: Any) -> int:
        """Record one event; returns its seq once durable, or raises ``RecorderUnavailable``.

        ``urgent=False`` (responses, notes: nobody waits for them) lets the record ride in
        the next group commit an urgent record starts, or one ``LAZY_DELAY`` later
        (``proxy.recording.commits``).
        """
        return await self.submit(kind, urgent=urgent, **fields)

    def submit(self, kind: str, *, urgent: bool = True, **fields: Any) -> asyncio.Future[int]:
        """``append`` without a coroutine: queued now, the future gives the seq once durable.

        The proxy records two records per request; a task for each costs more CPU than
        the record itself. Raises ``RecorderUnavailable`` at once when the recorder is down.
        """
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._accept(kind, urgent, fields, future)
        return future

    def post(self, kind: str, *, urgent: bool = False, **fields: Any) -> None:
        """A record nobody waits for (responses, notes, or one an urgent record follows).

        A failure to write it is the recorder's: it fails, says why, and refuses what
        comes next. Raises ``RecorderUnavailable`` at once when the recorder is down.
        """
        self._accept(kind, urgent, fields, None)

    def _accept(
        self,
        kind: str,
        urgent: bool,
        fields: dict[str, Any],
        future: asyncio.Future[int] | None,
    ) -> None:
        fmt.check_kind(kind)
        if kind == fmt.CHECKPOINT or kind.startswith("recorder."):
            raise ValueError(f"record kind {kind!r} is reserved for the recorder")
        self._ensure_ok()
        prepared, big = self._fields.prepare(kind, fields)
        if big is None and not self._sidecars.holding:
            self._queue(kind, prepared, urgent, future)
        else:
            self._sidecars.later(kind, prepared, big, urgent, future)

    def _queue(
        self,
        kind: str,
        prepared: dict[str, Any],
        urgent: bool,
        future: asyncio.Future[int] | None,
    ) -> None:
        assert self._commits is not None
        now = self._clock()
        self._maybe_rotate(now)
        self._enqueue(kind, prepared, future, now)
        assert self._pos is not None
        if kind == fmt.SESSION_END or self._pos.since_checkpoint >= self.checkpoint_every:
            self._enqueue(fmt.CHECKPOINT, {}, None, now)
        if urgent:
            self._commits.kick()
        else:
            self._commits.soon()

    async def flush(self) -> None:
        """Until every record accepted so far is durable or has failed (never raises)."""
        await self._sidecars.wait()
        commits = self._commits
        if self._pos is None or (self._durable and self._durable.seq >= self._pos.seq):
            return
        if self._state != "ok" or commits is None or not commits.busy:
            return
        await commits.flush_to(self._pos.seq)

    async def checkpoint(self) -> int | None:
        """Seal what is unsealed now; None if nothing was."""
        self._ensure_ok()
        assert self._pos is not None
        if self._pos.since_checkpoint == 0:
            return None
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        seq = self._enqueue(fmt.CHECKPOINT, {}, future, self._clock())
        self._kick()
        await future
        return seq

    async def recover(self) -> None:
        """Leave the failed state: cut back to the last fsynced record, then record that."""
        if self._state == "ok":
            return
        if self._state == "closed" or self._durable is None:
            raise RecorderUnavailable("recorder is not open")
        await self._drain()
        assert self._commits is not None
        try:
            truncated, broken = await self._commits.thread.call(self._disk.cut_back, self._durable)
        except Exception as exc:
            raise RecorderUnavailable(f"recovery failed: {safe_reason(exc)}") from None
        self._pos = self._durable
        self._state, cause, self.failure = "ok", self.failure, None
        intro = [] if self._durable.size or self._intro is None else [self._intro]
        kind = fmt.RECOVERED if truncated else fmt.RESUMED
        fields = {"file": self._durable.path.name, "cause": "write_error", "error": cause}
        if truncated:
            fields.update(truncated_bytes=truncated, broken=broken)
        future = self._enqueue_intro([*intro, (kind, fields)])
        self._kick()
        await future
        self._report("ok", None)

    async def close(self) -> None:
        """Write a final checkpoint, wait for the disk, release the file."""
        if self._state == "closed":
            return
        await self._housekeeper.stop()
        error: RecorderUnavailable | None = None
        if self._state == "ok":
            try:
                await self.checkpoint()
            except RecorderUnavailable as exc:
                error = exc
        await self._drain()
        assert self._commits is not None
        with contextlib.suppress(OSError):
            await self._commits.thread.call(self._disk.close)
        self._shutdown_executors()
        self._state, self.failure = "closed", None
        self._report("closed", None)
        if error is not None:
            raise error

    # ------------------------------------------------------------------ event loop side

    def _ensure_ok(self) -> None:
        if self._state == "failed":
            raise RecorderUnavailable(self.failure or "recorder failed")
        if self._state != "ok":
            raise RecorderUnavailable("recorder is not open")

    def _report(self, state: State, reason: str | None) -> None:
        if state == self._reported:
            return
        self._reported = state
        for callback in list(self._callbacks):
            try:
                callback(state, reason)
            except Exception:
                log.exception("recorder state callback failed")

    async def _store(self, data: bytes) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        assert self._aux is not None
        try:
            digest = await loop.run_in_executor(self._aux, store_blob, self.blobs, data)
        except (OSError, UnsafePath) as exc:
            self._fail(safe_reason(exc) if isinstance(exc, OSError) else str(exc), [])
            raise RecorderUnavailable(self.failure or "blob write failed") from None
        return fmt.blob_ref(digest, len(data))

    def _enqueue(
        self,
        kind: str,
        fields: dict[str, Any],
        future: asyncio.Future[int] | None,
        now: float,
    ) -> int:
        assert self._pos is not None and self._signer is not None and self._commits
        self._pos, line = next_line(self._pos, self._signer, kind, fields, now)
        self._commits.add(Item(self._pos, line, future))
        return self._pos.seq

    def _enqueue_intro(self, intro: list[tuple[str, dict[str, Any]]]) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        for number, (kind, fields) in enumerate(intro):
            if kind in fmt.FILE_START_KINDS:
                self._intro = (kind, fields)
            last = number == len(intro) - 1
            self._enqueue(kind, fields, future if last else None, self._clock())
        return future

    def _maybe_rotate(self, now: float) -> None:
        pos = self._pos
        assert pos is not None
        reason = rotation_due(pos, now, self.rotate_bytes, self.rotate_seconds)
        if reason is None:
            return
        if pos.since_checkpoint:
            self._enqueue(fmt.CHECKPOINT, {}, None, now)
            pos = self._pos
        index = pos.index + 1
        self._pos = next_file(pos, self.directory / file_name(now, index), index, now)
        fields = file_intro(self._pos, pos.path.name, "rotation")
        fields["rotated_by"] = reason
        self._intro = (fmt.FILE_START, fields)
        self._enqueue(fmt.FILE_START, fields, None, now)
        self._housekeeper.schedule_retention()

    def _kick(self) -> None:
        if self._commits is not None:
            self._commits.kick()

    def _durable_batch(self, batch: list[Item]) -> None:
        self._durable = batch[-1].pos
        self.stats.records += len(batch)
        self.stats.batches += 1

    def _write_failed(self, error: BaseException | None, batch: list[Item]) -> None:
        if error is None:
            self._fail(self.failure or "recorder failed", batch)
            return
        reason = str(error) if isinstance(error, UnsafePath) else safe_reason(error)
        self._fail(f"write failed: {reason}", batch)

    async def _drain(self) -> None:
        """Until nothing is held back, queued or on its way to the disk."""
        await self._sidecars.wait()
        if self._commits is not None:
            await self._commits.drain()

    def _fail(self, reason: str, batch: list[Item]) -> None:
        if self._state != "failed":
            log.error("recorder failed: %s", reason)
        self._state, self.failure = "failed", reason
        error = RecorderUnavailable(reason)
        queued = self._commits.take_queued() if self._commits is not None else []
        for item in [*batch, *queued]:
            if item.future is not None and not item.future.done():
                item.future.set_exception(error)
        if self._commits is not None:
            self._commits.wake_flushes(0, failed=True)
        self._report("failed", reason)

    def seal_if_idle(self, now: float) -> None:
        """Timer hook: checkpoint records left unsealed for ``checkpoint_seconds``."""
        pos = self._pos
        if self._state != "ok" or pos is None or not pos.since_checkpoint:
            return
        if now - pos.last_checkpoint_ts >= self.checkpoint_seconds:
            self._enqueue(fmt.CHECKPOINT, {}, None, self._clock())
            self._kick()

    def note_retention(self, deleted: list[str]) -> None:
        """Retention hook: deleting recordings is itself recorded."""
        if self._state == "ok":
            fields = {"deleted": deleted, "older_than_seconds": self.retention_seconds}
            self._enqueue(fmt.RETENTION, fields, None, self._clock())
            self._kick()

    def _shutdown_executors(self) -> None:
        if self._commits is not None:
            self._commits.stop()
        if self._aux is not None:
            self._aux.shutdown(wait=True)
        self._commits = self._aux = None
