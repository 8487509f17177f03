"""``sluice verify``: is each recording intact, and is all of it signed?

States, per file:

* ``verified``: the chain is intact and the last record is a checkpoint whose Ed25519
  signature verifies with a known key (``--public-key``, else ``recording-key*.pub``
  beside the recordings).
* ``repaired tail``: verified, and the recorder once cut a torn tail (a
  ``recorder.recovered`` record says where; a ``.broken`` copy kept the bytes).
* ``unsigned``: intact, but records after the last checkpoint (or none at all): a crash,
  or a file still being written. Nothing after the last checkpoint is provably original.
* ``torn tail``: the newest file ends in a partial record (a crash mid-write).
* ``tampered``: anything else, with the first bad seq (see ``scan`` for how it is chosen).

Files in one directory are also checked against each other: a file continues the one its
first record names, so a deleted, truncated or swapped file breaks the chain too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.recording import format as fmt
from proxy.recording.files import file_index, first_line, list_recordings
from proxy.recording.keys import directory_public_keys, key_id
from proxy.recording.scan import FileScan, scan_file

VERIFIED = "verified"
REPAIRED = "repaired tail"
UNSIGNED = "unsigned"
TORN = "torn tail"
TAMPERED = "tampered"


@dataclass
class FileResult:
    path: Path
    state: str
    first_bad_seq: int | None = None
    reason: str | None = None
    first_seq: int | None = None
    last_seq: int | None = None
    records: int = 0
    checkpoints: int = 0
    signed_through: int | None = None
    unsigned_from: int | None = None
    repaired: bool = False
    key_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Intact and signed to the end: what ``sluice verify`` exits 0 for."""
        return self.state in (VERIFIED, REPAIRED)

    def describe(self) -> str:
        name = str(self.path)
        span = f"seq {self.first_seq}-{self.last_seq}"
        keys = ", ".join(kid[:16] for kid in self.key_ids) or "none"
        if self.state == TAMPERED:
            return f"{name}: tampered at seq {self.first_bad_seq}: {self.reason}"
        if self.state == TORN:
            return (
                f"{name}: torn tail at seq {self.first_bad_seq}: {self.reason} "
                "(the recorder cuts it off when it next opens)"
            )
        if self.state == UNSIGNED:
            if not self.records:
                return f"{name}: unsigned: no records"
            return f"{name}: unsigned from seq {self.unsigned_from} ({span}, no checkpoint after)"
        note = ", a torn tail was cut by the recorder" if self.state == REPAIRED else ""
        return f"{name}: {self.state} ({span}, {self.checkpoints} checkpoints, key {keys}{note})"


def _result(scan: FileScan, newest: bool) -> FileResult:
    result = FileResult(
        scan.path,
        VERIFIED,
        first_seq=scan.first_seq,
        last_seq=scan.last_seq,
        records=scan.records,
        checkpoints=scan.checkpoints,
        signed_through=scan.last_checkpoint,
        repaired=scan.recovered,
        key_ids=sorted(scan.key_ids),
    )
    if scan.reason is not None:
        result.state = TORN if scan.torn and newest else TAMPERED
        result.first_bad_seq, result.reason = scan.bad_seq, scan.reason
    elif not scan.signed:
        result.state = UNSIGNED
        if scan.records:
            start = scan.last_checkpoint + 1 if scan.last_checkpoint else scan.first_seq
            result.unsigned_from = start
    elif scan.recovered:
        result.state = REPAIRED
    return result


def expand(paths: Iterable[Path | str]) -> list[Path]:
    """Files as given, directories as their recordings; raises FileNotFoundError if absent."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            out.extend(list_recordings(path))
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(str(path))
    return out


def _order(path: Path) -> tuple[int, str]:
    index = file_index(path)
    return (index if index is not None else 1 << 62, path.name)


def verify(
    paths: Iterable[Path | str], *, public_key: Ed25519PublicKey | None = None
) -> list[FileResult]:
    """Verify files and directories; one result per file, in the order found."""
    files = expand(paths)
    by_dir: dict[Path, list[Path]] = {}
    for path in files:
        by_dir.setdefault(path.parent.resolve(), []).append(path)
    results: dict[Path, FileResult] = {}
    for directory, group in by_dir.items():
        keys = (
            {key_id(public_key): public_key}
            if public_key is not None
            else directory_public_keys(directory)
        )
        listed = list_recordings(directory)
        newest = max(listed, key=_order).name if listed else None
        known = {p.name for p in listed}
        scans: dict[str, FileScan] = {}
        for path in sorted(group, key=_order):
            results[path] = _check(path, keys, scans, known, newest)
    return [results[path] for path in files]


def _check(
    path: Path,
    keys: dict[str, Ed25519PublicKey],
    scans: dict[str, FileScan],
    known: set[str],
    newest: str | None,
) -> FileResult:
    head = first_line(path)
    first = fmt.parse_line(head) if head is not None else None
    prev_name = str(first.get("prev_file") or "") if first else ""
    before = scans.get(prev_name)
    expect_prev = expect_seq = None
    if before is not None and before.intact and before.last_seq is not None:
        expect_prev, expect_seq = before.last_hash, before.last_seq + 1
    scan = scan_file(path, keys=keys, expect_prev=expect_prev, expect_seq=expect_seq)
    scans[path.name] = scan
    if scan.intact and prev_name and prev_name not in known and first is not None:
        older = [
            other
            for other in scans.values()
            if other.chain == scan.chain and _order(other.path) < _order(path)
        ]
        if older:
            scan.bad_seq = scan.first_seq
            scan.reason = f"previous file {prev_name} is missing while older files remain"
    return _result(scan, newest == path.name or path.name not in known)
