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

Fields the recorder treats specially (all kinds): ``headers`` (credential headers and the
caller's ``injected`` header names redacted; ``secret_values`` scrubbed, never stored),
``url`` (password and ``secret_values`` scrubbed), ``body`` (bytes or str: inline text,
base64, a sidecar blob or a truncated prefix), ``mask_spans`` (``Span`` objects or dicts),
and ``request_id`` (``session`` filled in from the request record when missing).
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
from proxy.recording.disk import Disk
from proxy.recording.disk_thread import DiskThread
from proxy.recording.errors import RecorderUnavailable, RecordingCorrupt, safe_reason
from proxy.recording.files import BLOBS_DIR, UnsafePath, file_name, write_all
from proxy.recording.housekeeping import Housekeeper
from proxy.recording.keys import KeyFileError, Signer
from proxy.recording.prepare import FieldPreparer
from proxy.recording.recovery import Position, file_intro, open_directory
from proxy.recording.storage import store_blob
from proxy.state import StateError

log = logging.getLogger("sluice.recording")

State = Literal["closed", "ok", "failed"]
#: How long a non-urgent record waits for an urgent one to share its fsync.
LAZY_DELAY = 0.02
StateCallback = Callable[[str, str | None], None]


def _write(fd: int, data: bytes) -> None:
    """The one place records reach the disk (tests inject errors here)."""
    write_all(fd, data)


@dataclass(slots=True)
class _Item:
    pos: Position
    line: bytes
    future: asyncio.Future[int] | None


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
        self._pending: list[_Item] = []
        self._committing: list[_Item] | None = None  # the batch the disk thread has
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._seq_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._order_tail: asyncio.Future[Any] | None = None  # the last record held back
        self._background: set[asyncio.Future[Any]] = set()
        self._lazy_kick: asyncio.TimerHandle | None = None
        self._housekeeper = Housekeeper(
            self,
            self.directory,
            checkpoint_seconds=checkpoint_seconds,
            retention_seconds=retention_seconds,
            clock=clock,
        )
        self._io: DiskThread | None = None
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
        self._io = DiskThread(asyncio.get_running_loop(), "sluice-recorder")
        self._aux = ThreadPoolExecutor(1, thread_name_prefix="sluice-recorder-aux")
        try:
            self._signer, plan = await self._io.call(
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
        self._kick()
        self._housekeeper.start(self._aux, lambda: self._pos.path if self._pos else self.directory)
        await future  # a failure here leaves the recorder open and failed: recover() or close()
        self._report("ok", None)

    async def append(self, kind: str, *, urgent: bool = True, **fields: Any) -> int:
        """Record one event; returns its seq once durable, or raises ``RecorderUnavailable``.

        ``urgent=False`` (responses, notes: nobody waits for them) lets the record ride in
        the next group commit an urgent record starts, or one ``LAZY_DELAY`` later: one
        fsync per request instead of two when requests come one at a time.
        """
        return await self.submit(kind, urgent=urgent, **fields)

    def submit(self, kind: str, *, urgent: bool = True, **fields: Any) -> asyncio.Future[int]:
        """``append`` without a coroutine: queued now, the future gives the seq once durable.

        The proxy records three records per request; a task for each costs more CPU than
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
        tail = self._order_tail
        if big is None and (tail is None or tail.done()):
            self._queue(kind, prepared, urgent, future)
            return
        # A sidecar blob is written first, in the aux thread; records accepted meanwhile
        # wait behind it, so the file keeps the order they were accepted in.
        later = asyncio.ensure_future(self._queue_later(tail, kind, prepared, big, urgent))
        self._order_tail = later
        if future is not None:
            later.add_done_callback(lambda done: _settle(future, done))
        else:
            self._background.add(later)
            later.add_done_callback(self._background_done)

    async def _queue_later(
        self,
        tail: asyncio.Future[Any] | None,
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

    def _background_done(self, done: asyncio.Future[Any]) -> None:
        self._background.discard(done)
        if done.cancelled() or (error := done.exception()) is None:
            return
        reason = str(error) if isinstance(error, RecorderUnavailable) else type(error).__name__
        log.warning("a background record was not written: %s", reason)

    def _queue(
        self,
        kind: str,
        prepared: dict[str, Any],
        urgent: bool,
        future: asyncio.Future[int] | None,
    ) -> None:
        self._maybe_rotate(self._clock())
        self._enqueue(kind, prepared, future)
        assert self._pos is not None
        if kind == fmt.SESSION_END or self._pos.since_checkpoint >= self.checkpoint_every:
            self._enqueue(fmt.CHECKPOINT, {}, None)
        if urgent:
            self._kick()
        elif self._lazy_kick is None:  # one timer at a time, left to run out: cheaper than
            # a timer per record, each cancelled by the next urgent one
            self._lazy_kick = asyncio.get_running_loop().call_later(LAZY_DELAY, self._lazy_due)

    async def flush(self) -> None:
        """Until every record accepted so far is durable or has failed (never raises)."""
        while self._order_tail is not None and not self._order_tail.done():
            await asyncio.wait([self._order_tail])
        if self._pos is None or (self._durable and self._durable.seq >= self._pos.seq):
            return
        if self._state != "ok" or not (self._pending or self._committing):
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq_waiters.append((self._pos.seq, waiter))
        self._kick()
        await waiter

    async def checkpoint(self) -> int | None:
        """Seal what is unsealed now; None if nothing was."""
        self._ensure_ok()
        assert self._pos is not None
        if self._pos.since_checkpoint == 0:
            return None
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        seq = self._enqueue(fmt.CHECKPOINT, {}, future)
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
        assert self._io is not None
        try:
            truncated, broken = await self._io.call(self._disk.cut_back, self._durable)
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
        assert self._io is not None
        with contextlib.suppress(OSError):
            await self._io.call(self._disk.close)
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
        self, kind: str, fields: dict[str, Any], future: asyncio.Future[int] | None
    ) -> int:
        pos, signer = self._pos, self._signer
        assert pos is not None and signer is not None
        ts = max(fmt.micros(self._clock()), pos.ts)
        seq = pos.seq + 1
        if kind == fmt.CHECKPOINT:
            record = fmt.make_checkpoint(
                seq,
                ts,
                pos.head,
                from_seq=pos.checkpoint_from,
                chain=pos.chain,
                key_id=signer.key_id,
                sign=signer.sign,
            )
        else:
            record = fmt.build_record(seq, ts, pos.head, kind, fields)
        line = fmt.encode_record(record)  # a value JSON cannot hold raises here, state intact
        sealed = kind == fmt.CHECKPOINT
        self._pos = Position(  # spelled out: dataclasses.replace costs more than the record
            pos.path,
            pos.index,
            pos.size + len(line),
            pos.file_started,
            pos.file_first_seq,
            seq,
            fmt.line_hash(line),
            pos.chain,
            seq + 1 if sealed else pos.checkpoint_from,
            0 if sealed else pos.since_checkpoint + 1,
            ts if sealed else pos.last_checkpoint_ts,
            ts,
        )
        self._pending.append(_Item(self._pos, line, future))
        return seq

    def _enqueue_intro(self, intro: list[tuple[str, dict[str, Any]]]) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        for number, (kind, fields) in enumerate(intro):
            if kind in fmt.FILE_START_KINDS:
                self._intro = (kind, fields)
            self._enqueue(kind, fields, future if number == len(intro) - 1 else None)
        return future

    def _maybe_rotate(self, now: float) -> None:
        pos = self._pos
        assert pos is not None
        if pos.seq <= pos.file_first_seq:
            return
        if pos.size >= self.rotate_bytes:
            reason = "size"
        elif now - pos.file_started >= self.rotate_seconds:
            reason = "age"
        else:
            return
        if pos.since_checkpoint:
            self._enqueue(fmt.CHECKPOINT, {}, None)
            pos = self._pos
        index = pos.index + 1
        path = self.directory / file_name(now, index)
        self._pos = pos._replace(
            path=path,
            index=index,
            size=0,
            file_started=now,
            file_first_seq=pos.seq + 1,
            checkpoint_from=pos.seq + 1,
        )
        fields = file_intro(self._pos, pos.path.name, "rotation")
        fields["rotated_by"] = reason
        self._intro = (fmt.FILE_START, fields)
        self._enqueue(fmt.FILE_START, fields, None)
        self._housekeeper.schedule_retention()

    def _lazy_due(self) -> None:
        self._lazy_kick = None
        self._kick()

    def _kick(self) -> None:
        """Group commit: everything queued while the last fsync ran goes in the next one."""
        if self._committing is not None or not self._pending:
            return
        if self._state != "ok":
            self._fail(self.failure or "recorder failed", [])
            return
        batch, self._pending = self._pending, []
        self._committing = batch
        assert self._io is not None
        self._io.post(self._disk.write_batch, batch, self._committed)

    def _committed(self, _result: None, error: BaseException | None) -> None:
        batch, self._committing = self._committing or [], None
        if error is not None:
            reason = str(error) if isinstance(error, UnsafePath) else safe_reason(error)
            self._fail(f"write failed: {reason}", batch)
        else:
            self._durable = batch[-1].pos
            self.stats.records += len(batch)
            self.stats.batches += 1
            for item in batch:
                if item.future is not None and not item.future.done():
                    item.future.set_result(item.pos.seq)
            self._kick()
        self._wake_flushers()
        if self._committing is None:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def _drain(self) -> None:
        """Until the disk thread holds no batch and nothing is queued for it."""
        while self._order_tail is not None and not self._order_tail.done():
            await asyncio.wait([self._order_tail])
        if self._pending and self._committing is None:
            self._kick()
        if self._committing is not None:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def _wake_flushers(self) -> None:
        durable = self._durable.seq if self._durable else 0
        failed = self._state != "ok"
        waiting = []
        for seq, waiter in self._seq_waiters:
            if failed or seq <= durable:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((seq, waiter))
        self._seq_waiters = waiting

    def _fail(self, reason: str, batch: list[_Item]) -> None:
        if self._state != "failed":
            log.error("recorder failed: %s", reason)
        self._state, self.failure = "failed", reason
        error = RecorderUnavailable(reason)
        for item in [*batch, *self._pending]:
            if item.future is not None and not item.future.done():
                item.future.set_exception(error)
        self._pending = []
        self._wake_flushers()
        self._report("failed", reason)

    def seal_if_idle(self, now: float) -> None:
        """Timer hook: checkpoint records left unsealed for ``checkpoint_seconds``."""
        pos = self._pos
        if self._state != "ok" or pos is None or not pos.since_checkpoint:
            return
        if now - pos.last_checkpoint_ts >= self.checkpoint_seconds:
            self._enqueue(fmt.CHECKPOINT, {}, None)
            self._kick()

    def note_retention(self, deleted: list[str]) -> None:
        """Retention hook: deleting recordings is itself recorded."""
        if self._state == "ok":
            fields = {"deleted": deleted, "older_than_seconds": self.retention_seconds}
            self._enqueue(fmt.RETENTION, fields, None)
            self._kick()

    def _shutdown_executors(self) -> None:
        if self._lazy_kick is not None:
            self._lazy_kick.cancel()
            self._lazy_kick = None
        if self._io is not None:
            self._io.stop()
        if self._aux is not None:
            self._aux.shutdown(wait=True)
        self._io = self._aux = None


def _settle(future: asyncio.Future[int], done: asyncio.Future[int]) -> None:
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif (error := done.exception()) is not None:
        future.set_exception(error)
    else:
        future.set_result(done.result())
