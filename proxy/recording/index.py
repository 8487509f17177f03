"""The reader's index of one recording file, built once and cached as ``<file>.idx``.

The index holds, per record, its byte offset, seq and a running maximum of ``ts`` (so a
time seek is a binary search even if the clock stepped back), plus per-session and
per-request row lists and summary counts. It is stored as a small JSON header followed
by raw arrays, so opening a 1 GiB recording reads a few megabytes and parses no records.

The cache is keyed by the file's size and mtime. When the file has only grown (the live
file) and the last indexed line is unchanged, the index is extended from where it ended
instead of rebuilt. The index is a convenience, never evidence: ``verify`` ignores it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.recording import format as fmt
from proxy.recording.files import iter_lines, write_new_private

MAGIC = b"SLUICE-IDX\x00\x03"  # bumped when what is counted changes: old caches rebuild
_ARRAYS = ("offsets", "seqs", "tsmax", "session_ptr", "session_rows", "request_ptr", "request_rows")
_COUNTS = ("records", "requests", "responses", "decisions", "denied", "held", "masked", "errors")


def _summary(ts: float) -> dict[str, Any]:
    return {
        "subject": None,
        "start": None,
        "end": None,
        "first_ts": ts,
        "last_ts": ts,
        "requests": 0,
        "denied": 0,
        "held": 0,
        "masked": 0,
        "errors": 0,
    }


def _csr(groups: dict[str, list[int]]) -> tuple[list[str], array[int], array[int]]:
    ids = list(groups)
    ptr, rows = array("q", [0]), array("q")
    for key in ids:
        rows.extend(groups[key])
        ptr.append(len(rows))
    return ids, ptr, rows


def _uncsr(ids: list[str], ptr: array[int], rows: array[int]) -> dict[str, list[int]]:
    return {key: rows[ptr[n] : ptr[n + 1]].tolist() for n, key in enumerate(ids)}


@dataclass
class FileIndex:
    path: Path
    covered: int = 0
    file_size: int = 0
    mtime_ns: int = 0
    tail_offset: int = -1
    tail_hash: str = ""
    offsets: array[int] = field(default_factory=lambda: array("q"))
    seqs: array[int] = field(default_factory=lambda: array("q"))
    tsmax: array[float] = field(default_factory=lambda: array("d"))
    session_ids: list[str] = field(default_factory=list)
    session_ptr: array[int] = field(default_factory=lambda: array("q", [0]))
    session_rows: array[int] = field(default_factory=lambda: array("q"))
    request_ids: list[str] = field(default_factory=list)
    request_ptr: array[int] = field(default_factory=lambda: array("q", [0]))
    request_rows: array[int] = field(default_factory=lambda: array("q"))
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    bad_offsets: list[int] = field(default_factory=list)
    contiguous: bool = True
    source: str = "built"
    _session_pos: dict[str, int] | None = field(default=None, repr=False)
    _request_pos: dict[str, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.offsets)

    def row_of(self, seq: int) -> int | None:
        if not self.seqs:
            return None
        if self.contiguous:
            row = seq - self.seqs[0]
            return row if 0 <= row < len(self.seqs) else None
        for row, value in enumerate(self.seqs):
            if value == seq:
                return row
        return None

    def session_rows_of(self, session: str) -> list[int]:
        if self._session_pos is None:
            self._session_pos = {key: n for n, key in enumerate(self.session_ids)}
        n = self._session_pos.get(session)
        return (
            []
            if n is None
            else self.session_rows[self.session_ptr[n] : self.session_ptr[n + 1]].tolist()
        )

    def request_rows_of(self, request_id: str) -> list[int]:
        if self._request_pos is None:
            self._request_pos = {key: n for n, key in enumerate(self.request_ids)}
        n = self._request_pos.get(request_id)
        return (
            []
            if n is None
            else self.request_rows[self.request_ptr[n] : self.request_ptr[n + 1]].tolist()
        )


def _decision_counts(action: str | None) -> tuple[str, ...]:
    if action in fmt.DENIED_ACTIONS:
        return ("decisions", "denied")
    if action in fmt.HELD_ACTIONS:
        return ("decisions", "held")
    return ("decisions",)


def _counted(kind: str, head: fmt.Head) -> tuple[str, ...]:
    """The counters a record adds to (file totals and its session's summary)."""
    if kind == fmt.REQUEST:
        if head.action is None:
            return ("requests",)
        return ("requests", *_decision_counts(head.action))
    if kind == fmt.RESPONSE:
        return ("responses", "masked") if head.masked else ("responses",)
    if kind == fmt.DECISION:
        return _decision_counts(head.action)
    if kind == fmt.ERROR:
        return ("errors",)
    return ()


class _Builder:
    """Feeds lines into an index; can start from an existing one to extend it."""

    def __init__(self, base: FileIndex) -> None:
        self.index = base
        self.sessions = _uncsr(base.session_ids, base.session_ptr, base.session_rows)
        self.requests = _uncsr(base.request_ids, base.request_ptr, base.request_rows)
        self.request_session: dict[str, str] = {}
        self.last_ts = base.tsmax[-1] if base.tsmax else float("-inf")
        self.tail: tuple[int, bytes] | None = None

    def feed(self, offset: int, line: bytes) -> None:
        index = self.index
        head = fmt.parse_head(line)
        if head is None:
            index.bad_offsets.append(offset)
            return
        row = len(index.offsets)
        if row and head.seq != index.seqs[-1] + 1:
            index.contiguous = False
        index.offsets.append(offset)
        index.seqs.append(head.seq)
        if head.ts > self.last_ts:
            self.last_ts = head.ts
        index.tsmax.append(self.last_ts)
        self.tail = (offset, line)
        counts, kind, session, request_id = index.counts, head.kind, head.session, head.request_id
        counts["records"] += 1
        if request_id is not None:
            self.requests.setdefault(request_id, []).append(row)
            if session is None:
                session = self.request_session.get(request_id)
            elif kind == fmt.REQUEST:
                self.request_session[request_id] = session
        counted = _counted(kind, head)
        for name in counted:
            counts[name] += 1
        if session is None:
            return
        self.sessions.setdefault(session, []).append(row)
        summary = index.sessions.get(session)
        if summary is None:
            summary = index.sessions[session] = _summary(head.ts)
        if head.ts < summary["first_ts"]:
            summary["first_ts"] = head.ts
        if head.ts > summary["last_ts"]:
            summary["last_ts"] = head.ts
        if kind == fmt.SESSION_START:
            summary["start"] = head.ts
            summary["subject"] = json.loads(line).get("subject")
        elif kind == fmt.SESSION_END:
            summary["end"] = head.ts
        for name in counted:
            if name in summary:
                summary[name] += 1

    def finish(self) -> FileIndex:
        index = self.index
        if self.tail is not None:
            index.tail_offset, index.tail_hash = self.tail[0], fmt.line_hash(self.tail[1] + b"\n")
        index.session_ids, index.session_ptr, index.session_rows = _csr(self.sessions)
        index.request_ids, index.request_ptr, index.request_rows = _csr(self.requests)
        index._session_pos = index._request_pos = None
        return index


def _feed_from(builder: _Builder, path: Path, start: int, end: int) -> None:
    """Index complete lines in ``[start, end)``: what the file held when it was stat'ed."""
    for offset, line, complete in iter_lines(path, start):
        if not complete or offset + len(line) + 1 > end:
            break
        builder.feed(offset, line)
        builder.index.covered = offset + len(line) + 1


def save(index: FileIndex) -> None:
    header: dict[str, Any] = {
        "byteorder": sys.byteorder,
        "arrays": [[name, len(getattr(index, name))] for name in _ARRAYS],
    }
    for name in ("covered", "file_size", "mtime_ns", "tail_offset", "tail_hash", "contiguous"):
        header[name] = getattr(index, name)
    for name in ("session_ids", "request_ids", "sessions", "counts", "bad_offsets"):
        header[name] = getattr(index, name)
    raw = json.dumps(header, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<Q", len(raw)), raw]
    parts.extend(getattr(index, name).tobytes() for name in _ARRAYS)
    write_new_private(index.path.with_name(index.path.name + ".idx"), b"".join(parts))


def load(path: Path) -> FileIndex | None:
    """The cached index for ``path`` (whatever its freshness), or None if unusable."""
    try:
        fd = os.open(path.with_name(path.name + ".idx"), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    try:
        if not data.startswith(MAGIC):
            return None
        (length,) = struct.unpack_from("<Q", data, len(MAGIC))
        start = len(MAGIC) + 8
        header = json.loads(data[start : start + length])
        if header["byteorder"] != sys.byteorder:
            return None
        index = FileIndex(path, source="cache")
        for name, value in header.items():
            if name not in ("byteorder", "arrays"):
                setattr(index, name, value)
        pos = start + length
        for name, count in header["arrays"]:
            values = array("d" if name == "tsmax" else "q")
            size = count * values.itemsize
            values.frombytes(data[pos : pos + size])
            pos += size
            setattr(index, name, values)
        return index
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def _tail_matches(index: FileIndex) -> bool:
    if index.tail_offset < 0:
        return index.covered == 0
    with open(index.path, "rb") as handle:
        handle.seek(index.tail_offset)
        line = handle.readline()
    return index.tail_offset + len(line) == index.covered and fmt.line_hash(line) == index.tail_hash


def open_index(path: Path, *, cache: bool = True, known: FileIndex | None = None) -> FileIndex:
    """Load the cached index if fresh, extend it if the file only grew, else rebuild.

    ``known``: an index already in memory for this file, kept as it is while fresh.
    """
    path = Path(path)
    info = os.stat(path)
    if known is not None and (known.file_size, known.mtime_ns) == (
        info.st_size,
        info.st_mtime_ns,
    ):
        return known
    cached = load(path) if cache else None
    if cached is not None and (cached.file_size, cached.mtime_ns) == (
        info.st_size,
        info.st_mtime_ns,
    ):
        return cached
    if cached is not None and info.st_size > cached.covered and _tail_matches(cached):
        builder, cached.source = _Builder(cached), "extended"
        _feed_from(builder, path, cached.covered, info.st_size)
    else:
        builder = _Builder(FileIndex(path))
        _feed_from(builder, path, 0, info.st_size)
    index = builder.finish()
    index.file_size, index.mtime_ns = info.st_size, info.st_mtime_ns
    if cache:
        with contextlib.suppress(OSError):
            save(index)
    return index
