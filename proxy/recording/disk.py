"""The recorder's file work, run in its one I/O thread: batches, fsyncs, recovery cuts.

Nothing here touches the event loop. Each batch is written with one ``write`` per file
and made durable with one ``fsync`` per file (plus the directory when a file was
created), which is what makes group commit cheap.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from proxy.recording.files import (
    UnsafePath,
    broken_name,
    copy_private,
    file_index,
    fsync_dir,
    list_recordings,
    open_append,
)
from proxy.recording.recovery import Position, keep_and_truncate


class Line(Protocol):
    pos: Position
    line: bytes


class Disk:
    def __init__(self, directory: Path, write: Callable[[int, bytes], None]) -> None:
        self.directory = directory
        self._write = write
        self._fd: int | None = None
        self._path: Path | None = None

    def write_batch(self, batch: Sequence[Line]) -> None:
        """Write and fsync every line, grouped per file, in order."""
        start = 0
        while start < len(batch):
            path = batch[start].pos.path
            end = start
            while end < len(batch) and batch[end].pos.path == path:
                end += 1
            first = batch[start]
            fd, created = self._fd_for(path, first.pos.size - len(first.line))
            self._write(fd, b"".join(item.line for item in batch[start:end]))
            os.fsync(fd)
            if created:
                fsync_dir(self.directory)
            start = end

    def _fd_for(self, path: Path, expected_size: int) -> tuple[int, bool]:
        if self._fd is not None and self._path == path:
            return self._fd, False
        self.close()
        fd, size, created = open_append(path)
        if size != expected_size:
            os.close(fd)
            raise UnsafePath(f"{path.name} changed underneath the recorder")
        self._fd, self._path = fd, path
        return fd, created

    def close(self) -> None:
        fd, self._fd, self._path = self._fd, None, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def cut_back(self, durable: Position) -> tuple[int, str | None]:
        """Remove everything after the last fsynced record; ``(bytes cut, .broken copy)``.

        Files begun after it (a rotation that failed) are moved aside to ``.broken``.
        """
        self.close()
        for path in list_recordings(self.directory):
            if (file_index(path) or 0) > durable.index:
                if path.stat().st_size:
                    copy_private(path, broken_name(path))
                path.unlink()
                fsync_dir(self.directory)
        try:
            size = os.lstat(durable.path).st_size
        except FileNotFoundError:
            size = 0
        if size < durable.size:
            raise UnsafePath(f"{durable.path.name} shrank underneath the recorder")
        if size == durable.size:
            return 0, None
        return size - durable.size, keep_and_truncate(durable.path, durable.size)
