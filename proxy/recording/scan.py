"""One pass over a recording file: chain, sequence, checkpoints and sidecars checked.

Shared by the verifier and by crash recovery so both agree on what "damaged" means. Most
lines are checked by their head only (seq and prev by regex, bytes by hash): a changed
byte anywhere in line N breaks line N+1's ``prev``. Checkpoints, recorder records, lines
that reference sidecars and the last line are parsed in full and must be canonical.

``bad_seq`` is the earliest record the chain can no longer vouch for:

* a damaged (unparsable) line, or a line cut short: its own position;
* a sequence that skips or repeats (deleted, duplicated, swapped lines): the first
  position holding the wrong record;
* a ``prev`` mismatch between two well-formed lines: the earlier line if the later one is
  itself vouched for by its successor, otherwise the later one.

``torn`` says the damage is confined to the tail: from the first bad line to the end of
the file nothing parses. Only then, and only in the newest file, may recovery cut it off.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from proxy.recording import format as fmt
from proxy.recording.files import BLOBS_DIR, iter_lines
from proxy.recording.keys import signature_valid

_Line = tuple[int, bytes, bool]


@dataclass
class FileScan:
    path: Path
    size: int = 0
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    good_end: int = 0
    first: dict[str, Any] | None = None
    chain: str | None = None
    last_kind: str | None = None
    last_ts: float | None = None
    last_checkpoint: int | None = None
    checkpoints: int = 0
    key_ids: set[str] = field(default_factory=set)
    recovered: bool = False
    bad_seq: int | None = None
    reason: str | None = None
    torn: bool = False
    torn_offset: int | None = None
    max_seq: int = 0

    @property
    def intact(self) -> bool:
        return self.reason is None

    @property
    def signed(self) -> bool:
        return self.intact and self.records > 0 and self.last_kind == fmt.CHECKPOINT


class _Peekable:
    def __init__(self, lines: Iterator[_Line]) -> None:
        self._lines = lines
        self._next: _Line | None = None

    def __iter__(self) -> _Peekable:
        return self

    def __next__(self) -> _Line:
        if self._next is not None:
            item, self._next = self._next, None
            return item
        return next(self._lines)

    def peek(self) -> _Line | None:
        if self._next is None:
            self._next = next(self._lines, None)
        return self._next


def _sha(line: bytes) -> str:
    digest = hashlib.sha256(line)
    digest.update(b"\n")
    return digest.hexdigest()


def _nothing_parses_after(lines: _Peekable) -> bool:
    return all(not complete or fmt.parse_head(line) is None for _, line, complete in lines)


def _blob_problem(record: dict[str, Any], blobs: Path) -> str | None:
    body = record.get("body")
    if not isinstance(body, dict) or "blob" not in body:
        return None
    digest = str(body["blob"])
    path = blobs / digest
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return f"sidecar body {digest[:16]} is missing"
    hasher, size = hashlib.sha256(), 0
    try:
        while chunk := os.read(fd, 1 << 20):
            hasher.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if hasher.hexdigest() != digest or size != body.get("size"):
        return f"sidecar body {digest[:16]} was altered"
    return None


def _checkpoint_problem(
    record: dict[str, Any] | None,
    expected_from: int,
    chain: str | None,
    keys: dict[str, Ed25519PublicKey] | None,
) -> str | None:
    if record is None:
        return "checkpoint is not a canonical record"
    if record.get("to_seq") != record["seq"] - 1 or record.get("head") != record["prev"]:
        return "checkpoint does not seal the record before it"
    if record.get("from_seq") != expected_from:
        return f"checkpoint range starts at {record.get('from_seq')}, expected {expected_from}"
    if chain is not None and record.get("chain") != chain:
        return "checkpoint belongs to another chain"
    if keys is None:
        return None
    key_id = str(record.get("key_id"))
    key = keys.get(key_id)
    if key is None:
        return f"checkpoint signed by an unknown key {key_id[:16]}"
    try:
        signature = base64.b64decode(str(record.get("sig")), validate=True)
    except (binascii.Error, ValueError):
        return "checkpoint signature is malformed"
    if not signature_valid(key, signature, fmt.checkpoint_message(record)):
        return "checkpoint signature does not verify"
    return None


def scan_file(
    path: Path,
    *,
    keys: dict[str, Ed25519PublicKey] | None,
    expect_prev: str | None = None,
    expect_seq: int | None = None,
    check_blobs: bool = True,
) -> FileScan:
    """Check one file. ``keys=None`` skips signatures (recovery trusts only the chain)."""
    scan = FileScan(Path(path), size=os.stat(path).st_size)
    blobs = scan.path.parent / BLOBS_DIR
    lines = _Peekable(iter_lines(scan.path))
    prev_line: bytes | None = None
    prev_parsed = False
    prev_self_vouched = False
    expected, prev_hash = expect_seq, expect_prev

    def fail(seq: int | None, reason: str, *, tail_offset: int | None = None) -> FileScan:
        if seq is None and (nxt := lines.peek()) is not None and nxt[2]:
            after = fmt.parse_head(nxt[1])
            seq = after.seq - 1 if after is not None else None
        scan.bad_seq, scan.reason = seq, reason
        if tail_offset is not None and _nothing_parses_after(lines):
            scan.torn, scan.torn_offset = True, tail_offset
        return scan

    for offset, line, complete in lines:
        position = expected if expected is not None else None
        if not complete:
            return fail(position, "record cut short (no newline)", tail_offset=offset)
        head = fmt.parse_head(line)
        if head is None:
            return fail(position, "not a valid record", tail_offset=offset)
        scan.max_seq = max(scan.max_seq, head.seq)
        if expected is None:
            expected = head.seq
        following = lines.peek()
        is_last = following is None or not following[2]
        record: dict[str, Any] | None = None
        needs_parse = (
            is_last
            or prev_line is None
            or head.kind == fmt.CHECKPOINT
            or head.kind.startswith("recorder.")
            or (check_blobs and b'"blob":"' in line)
        )
        if needs_parse:
            record = fmt.parse_line(line)
            if record is None:
                torn = None if fmt.is_json(line) else offset
                return fail(expected, "not a canonical record", tail_offset=torn)
        if head.seq != expected or (prev_hash is not None and head.prev != prev_hash):
            if prev_line is not None and not prev_parsed and fmt.parse_line(prev_line) is None:
                return fail(expected - 1, f"record {expected - 1} is damaged")
            if head.seq < expected:
                return fail(expected, f"record {head.seq} appears again where {expected} belongs")
            if head.seq > expected:
                return fail(expected, f"record {expected} is missing or out of place")
            if prev_line is None:
                return fail(expected, "does not continue the previous file's chain")
            if prev_self_vouched:
                return fail(expected, f"record {expected} was altered")
            vouched = (
                following is not None
                and following[2]
                and ((nxt := fmt.parse_head(following[1])) is not None and nxt.prev == _sha(line))
            )
            if vouched or is_last:
                return fail(expected - 1, f"record {expected - 1} was altered")
            return fail(expected, f"record {expected} was altered")
        if prev_line is None:
            assert record is not None
            scan.first, scan.first_seq = record, head.seq
            scan.chain = str(record.get("chain")) if record.get("chain") else None
            if head.kind not in fmt.FILE_START_KINDS:
                return fail(head.seq, "file does not begin with a recorder.file record")
            starts_chain = head.kind == fmt.CHAIN_RESET or not record.get("prev_file")
            if starts_chain and head.prev != fmt.GENESIS:
                return fail(head.seq, "a new chain must start from the genesis hash")
        if head.kind == fmt.CHECKPOINT:
            start = (scan.last_checkpoint or 0) + 1
            expected_from = max(start, scan.first_seq or head.seq)
            problem = _checkpoint_problem(record, expected_from, scan.chain, keys)
            if problem is not None:
                return fail(head.seq, problem)
            assert record is not None
            scan.checkpoints += 1
            scan.last_checkpoint = head.seq
            scan.key_ids.add(str(record.get("key_id")))
        elif record is not None:
            if head.kind == fmt.RECOVERED:
                scan.recovered = True
            if check_blobs and (problem := _blob_problem(record, blobs)) is not None:
                return fail(head.seq, problem)
        prev_line, prev_parsed = line, record is not None
        prev_self_vouched = head.kind == fmt.CHECKPOINT and keys is not None
        prev_hash = _sha(line)
        expected = head.seq + 1
        scan.records += 1
        scan.last_seq, scan.last_hash, scan.last_kind = head.seq, prev_hash, head.kind
        scan.last_ts = head.ts
        scan.good_end = offset + len(line) + 1
    return scan
