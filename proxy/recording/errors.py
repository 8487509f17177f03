"""Failures the recorder reports: callers fail closed on the first, operators act on the second."""

from __future__ import annotations

import errno
from pathlib import Path


class RecorderUnavailable(Exception):
    """Records cannot be made durable right now; the gateway must stop serving, not go blind.

    ``reason`` is safe to show an agent or a console: an errno name and a fixed phrase,
    never a path, a header or a body.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RecordingCorrupt(Exception):
    """A recording is damaged somewhere other than a torn tail; it is reported, never repaired."""

    def __init__(self, file: Path | str, seq: int | None, reason: str) -> None:
        where = f" at seq {seq}" if seq is not None else ""
        super().__init__(f"{Path(file).name}: corrupt{where}: {reason}")
        self.file = Path(file)
        self.seq = seq
        self.reason = reason


def safe_reason(exc: BaseException) -> str:
    """An OS error as ``ENOSPC (No space left on device)``: no paths, which can name users."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, f"errno {exc.errno}")
        text = exc.strerror or "I/O error"
        return f"{name} ({text})"
    if isinstance(exc, ValueError):  # os.write on a closed descriptor, a closed file object
        return "file closed"
    return type(exc).__name__
