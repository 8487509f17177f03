"""The public reader the console uses: random access into recordings without loading them.

``Recording.open(path)`` takes one file or a directory of files. Each file's index is
loaded from its ``.idx`` cache (or built once and cached), so opening is cheap however
large the recording; records and bodies are read from disk only when asked for. The
reader never repairs or trusts anything: ``verify`` says whether the bytes are original.

Not thread-safe: use one ``Recording`` per thread (they share nothing but the files).
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from proxy.recording import format as fmt
from proxy.recording.errors import RecordingCorrupt
from proxy.recording.files import BLOBS_DIR, list_recordings
from proxy.recording.index import FileIndex, open_index
from proxy.recording.storage import load_blob


@dataclass(frozen=True)
class SessionSummary:
    id: str
    subject: str | None
    start: float
    end: float
    duration: float
    requests: int
    denied: int
    held: int
    masked: int
    errors: int
    ended: bool
    files: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "files": list(self.files)}


@dataclass
class Flow:
    """One request's records: the request, its decisions, the response, any errors."""

    request_id: str
    session: str | None = None
    request: dict[str, Any] | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)
    response: dict[str, Any] | None = None
    request_body: dict[str, Any] | None = None  # a streamed body, recorded after it was sent
    errors: list[dict[str, Any]] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        self.session = self.session or record.get("session")
        if kind == fmt.REQUEST and self.request is None:
            self.request = record
            decision = fmt.decision_of(record)
            if decision is not None:  # the first decision, carried by the request record
                self.decisions.append(decision)
        elif kind == fmt.RESPONSE and self.response is None:
            self.response = record
        elif kind == fmt.REQUEST_BODY and self.request_body is None:
            self.request_body = record
        elif kind == fmt.DECISION:
            self.decisions.append(record)
        elif kind == fmt.ERROR:
            self.errors.append(record)
        else:
            self.other.append(record)


class Recording:
    def __init__(
        self, files: list[Path], *, directory: Path | None = None, cache: bool = True
    ) -> None:
        self.files = files
        self.directory = directory
        self._cache = cache
        self._handles: dict[Path, IO[bytes]] = {}
        self._load()

    def _load(self) -> None:
        self.indexes: list[FileIndex] = [open_index(p, cache=self._cache) for p in self.files]
        self._firsts = [index.seqs[0] if index.seqs else -1 for index in self.indexes]

    @classmethod
    def open(cls, path: Path | str, *, cache: bool = True) -> Recording:
        """A recording file, or every recording file in a directory (oldest first)."""
        path = Path(path)
        if path.is_dir():
            return cls(list_recordings(path), directory=path, cache=cache)
        if not path.is_file():
            raise FileNotFoundError(str(path))
        return cls([path], cache=cache)

    def refresh(self) -> None:
        """Pick up records appended (and files added or removed) since opening; indexes
        of files that have not changed are kept, so a long retention costs a stat each."""
        if self.directory is not None:
            self.files = list_recordings(self.directory)
        self.close()
        known = {index.path: index for index in self.indexes}
        self.indexes = [
            open_index(path, cache=self._cache, known=known.get(path)) for path in self.files
        ]
        self._firsts = [index.seqs[0] if index.seqs else -1 for index in self.indexes]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> Recording:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return sum(len(index) for index in self.indexes)

    @property
    def first_seq(self) -> int | None:
        return next((index.seqs[0] for index in self.indexes if index.seqs), None)

    @property
    def last_seq(self) -> int | None:
        return next((index.seqs[-1] for index in reversed(self.indexes) if index.seqs), None)

    @property
    def counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for index in self.indexes:
            for key, value in index.counts.items():
                total[key] = total.get(key, 0) + value
        total["bad_lines"] = sum(len(index.bad_offsets) for index in self.indexes)
        return total

    # ------------------------------------------------------------------ records

    def _read(self, index: FileIndex, row: int) -> dict[str, Any]:
        handle = self._handles.get(index.path)
        if handle is None:
            handle = self._handles[index.path] = open(index.path, "rb")  # noqa: SIM115
        handle.seek(index.offsets[row])
        try:
            record: dict[str, Any] = json.loads(handle.readline())
        except ValueError:
            raise RecordingCorrupt(index.path, index.seqs[row], "unreadable record") from None
        return record

    def _locate(self, seq: int) -> tuple[FileIndex, int] | None:
        at = bisect.bisect_right(self._firsts, seq) - 1
        for index in [self.indexes[at]] if at >= 0 else []:
            row = index.row_of(seq)
            if row is not None:
                return index, row
        for index in self.indexes:  # seqs out of order (a damaged file): look everywhere
            row = index.row_of(seq) if not index.contiguous else None
            if row is not None:
                return index, row
        return None

    def get(self, seq: int) -> dict[str, Any]:
        """The record with this seq; KeyError if there is none."""
        found = self._locate(seq)
        if found is None:
            raise KeyError(seq)
        return self._read(*found)

    def iter_range(
        self, from_seq: int | None = None, to_seq: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Records with ``from_seq <= seq <= to_seq`` (either end open), in file order."""
        low = from_seq if from_seq is not None else -(1 << 62)
        high = to_seq if to_seq is not None else 1 << 62
        for index in self.indexes:
            if not index.seqs or (index.seqs[-1] < low and index.contiguous):
                continue
            if index.seqs[0] > high and index.contiguous:
                break
            start = max(0, low - index.seqs[0]) if index.contiguous else 0
            for row in range(start, len(index.seqs)):
                seq = index.seqs[row]
                if seq > high and index.contiguous:
                    break
                if low <= seq <= high:
                    yield self._read(index, row)

    def seek_time(self, ts: float) -> int | None:
        """The first seq recorded at or after ``ts``; None if everything is older."""
        for index in self.indexes:
            if index.tsmax and index.tsmax[-1] >= ts:
                return int(index.seqs[bisect.bisect_left(index.tsmax, ts)])
        return None

    # ------------------------------------------------------------------ sessions and flows

    def sessions(self) -> list[SessionSummary]:
        merged: dict[str, dict[str, Any]] = {}
        for index in self.indexes:
            for sid, part in index.sessions.items():
                into = merged.get(sid)
                if into is None:
                    merged[sid] = {**part, "files": [index.path.name]}
                    continue
                into["files"].append(index.path.name)
                into["first_ts"] = min(into["first_ts"], part["first_ts"])
                into["last_ts"] = max(into["last_ts"], part["last_ts"])
                for key in ("subject", "start", "end"):
                    into[key] = part[key] if part[key] is not None else into[key]
                for key in ("requests", "denied", "held", "masked", "errors"):
                    into[key] += part[key]
        out = []
        for sid, s in merged.items():
            start = s["start"] if s["start"] is not None else s["first_ts"]
            end = s["end"] if s["end"] is not None else s["last_ts"]
            out.append(
                SessionSummary(
                    sid,
                    s["subject"],
                    start,
                    end,
                    max(0.0, end - start),
                    s["requests"],
                    s["denied"],
                    s["held"],
                    s["masked"],
                    s["errors"],
                    s["end"] is not None,
                    tuple(s["files"]),
                )
            )
        return sorted(out, key=lambda summary: (summary.start, summary.id))

    def session_records(self, session: str) -> Iterator[dict[str, Any]]:
        for index in self.indexes:
            for row in index.session_rows_of(session):
                yield self._read(index, row)

    def flows(self, session: str) -> list[Flow]:
        """The session's requests, each with its decisions, response and errors."""
        flows: dict[str, Flow] = {}
        for record in self.session_records(session):
            request_id = record.get("request_id")
            if request_id is not None:
                flows.setdefault(request_id, Flow(request_id)).add(record)
        return list(flows.values())

    def flow(self, request_id: str) -> Flow | None:
        flow = Flow(request_id)
        for index in self.indexes:
            for row in index.request_rows_of(request_id):
                flow.add(self._read(index, row))
        return flow if flow.request or flow.response or flow.decisions or flow.errors else None

    def body(self, record: dict[str, Any] | Flow, which: Literal["request", "response"]) -> bytes:
        """A body as bytes (sidecars resolved and hash-checked); b"" when there is none."""
        if isinstance(record, Flow):
            chosen = record.request if which == "request" else record.response
            if chosen is not None and which == "request" and "body" not in chosen:
                chosen = record.request_body or chosen  # streamed: its own record
            if chosen is None:
                return b""
            record = chosen
        kind = record.get("kind")
        if kind == fmt.REQUEST_BODY:
            kind = fmt.REQUEST
        if kind in (fmt.REQUEST, fmt.RESPONSE) and kind != which:
            raise ValueError(f"record {record.get('seq')} is a {kind}, not a {which}")
        home = self.directory or (self.files[0].parent if self.files else Path("."))
        blobs = home / BLOBS_DIR
        return fmt.decode_body(record.get("body"), lambda digest: load_blob(blobs, digest))
