"""Where the recorder picks up on open: resume, cut a torn tail, or restart the chain.

Mirrors what write-ahead logs do (etcd, LevelDB): only damage confined to the tail of the
newest file is repaired, after keeping a ``.broken`` copy; the file is truncated to its
last good record and both file and directory are fsynced. Damage anywhere else is never
touched: the file is reported (``RecordingCorrupt``) and left as it is, and recording
continues in a new file whose ``recorder.chain_reset`` record names it.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from proxy.recording import format as fmt
from proxy.recording.errors import RecordingCorrupt
from proxy.recording.files import (
    BLOBS_DIR,
    UnsafePath,
    broken_name,
    copy_private,
    ensure_private_dir,
    file_index,
    file_name,
    first_line,
    fsync_dir,
    iter_lines,
    last_line,
    list_recordings,
    planted_links,
)
from proxy.recording.keys import Signer, load_or_create_signing_key, publish_public_key
from proxy.recording.scan import scan_file
from proxy.recording.storage import clean_temp_blobs

log = logging.getLogger("sluice.recording")


class Position(NamedTuple):
    """The chain and file state after some record: enough to continue from it.

    A NamedTuple: the writer makes one per record, and a frozen dataclass costs several
    times as much to build.
    """

    path: Path
    index: int
    size: int
    file_started: float
    file_first_seq: int
    seq: int
    head: str
    chain: str
    checkpoint_from: int
    since_checkpoint: int
    last_checkpoint_ts: float
    ts: float


@dataclass
class OpenPlan:
    position: Position
    intro: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    problems: list[RecordingCorrupt] = field(default_factory=list)


def new_chain_id() -> str:
    return secrets.token_hex(8)


def _new_file(
    directory: Path, now: float, index: int, seq: int, head: str, chain: str, path: Path | None
) -> Position:
    path = path or directory / file_name(now, index)
    return Position(path, index, 0, now, seq + 1, seq, head, chain, seq + 1, 0, now, now)


def file_intro(position: Position, prev_file: str | None, reason: str) -> dict[str, Any]:
    return {
        "file": position.path.name,
        "index": position.index,
        "chain": position.chain,
        "prev_file": prev_file,
        "reason": reason,
    }


def _continue_after(
    directory: Path, older: list[Path], now: float, index: int, path: Path | None
) -> tuple[Position, str | None]:
    """A fresh file continuing the chain of the newest older file (or a new chain)."""
    if older:
        prev = older[-1]
        tail, head_line = last_line(prev), first_line(prev)
        last = fmt.parse_line(tail[1]) if tail else None
        first = fmt.parse_line(head_line) if head_line else None
        if last is not None and first is not None:
            chain = str(first.get("chain") or new_chain_id())
            head = fmt.line_hash(tail[1] + b"\n") if tail else fmt.GENESIS
            return _new_file(directory, now, index, last["seq"], head, chain, path), prev.name
    return _new_file(directory, now, index, 0, fmt.GENESIS, new_chain_id(), path), None


def _max_seq(path: Path) -> int:
    best = 0
    for _, line, complete in iter_lines(path):
        head = fmt.parse_head(line) if complete else None
        if head is not None and head.seq > best:
            best = head.seq
    return best


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def keep_and_truncate(path: Path, size: int) -> str:
    """Copy the file to ``.broken`` (fsynced), then cut it to ``size``; returns the copy's name."""
    broken = broken_name(path)
    copy_private(path, broken)
    _truncate(path, size)
    return broken.name


def open_directory(directory: Path, key_path: Path, now: float) -> tuple[Signer, OpenPlan]:
    """Everything the recorder does on open, off the loop: dirs, key, leftovers, plan."""
    ensure_private_dir(directory)
    ensure_private_dir(directory / BLOBS_DIR)
    signer = load_or_create_signing_key(key_path)
    publish_public_key(directory, signer)
    clean_temp_blobs(directory / BLOBS_DIR)
    return signer, plan_open(directory, now)


def plan_open(directory: Path, now: float) -> OpenPlan:
    """Inspect (and if needed repair) the newest file; say where appending continues."""
    links = planted_links(directory)
    if links:
        raise UnsafePath(f"{links[0]} is a symlink; refusing to record there")
    files = list_recordings(directory)
    if not files:
        position, _ = _continue_after(directory, [], now, 1, None)
        return OpenPlan(position, [(fmt.FILE_START, file_intro(position, None, "start"))])
    newest = files[-1]
    index = file_index(newest) or len(files)
    scan = scan_file(newest, keys=None, check_blobs=False)
    if not scan.intact and not scan.torn:
        problem = RecordingCorrupt(newest, scan.bad_seq, scan.reason or "damaged")
        log.error("recording %s; starting a new chain in a new file", problem)
        seq = max(_max_seq(newest), scan.max_seq)
        position = _new_file(directory, now, index + 1, seq, fmt.GENESIS, new_chain_id(), None)
        intro = file_intro(position, None, "chain_reset")
        intro.update(bad_file=newest.name, bad_seq=scan.bad_seq, bad_reason=scan.reason)
        return OpenPlan(position, [(fmt.CHAIN_RESET, intro)], [problem])
    intro: list[tuple[str, dict[str, Any]]] = []
    if scan.torn:
        offset = scan.torn_offset or 0
        broken = keep_and_truncate(newest, offset)
        log.warning("recording %s had a torn tail; cut at byte %d", newest.name, offset)
        recovered = {
            "file": newest.name,
            "cause": "torn_tail",
            "truncated_bytes": scan.size - offset,
            "broken": broken,
            "bad_seq": scan.bad_seq,
        }
        intro.append((fmt.RECOVERED, recovered))
    if scan.records == 0:  # nothing usable in the newest file: start it afresh
        position, prev_file = _continue_after(directory, files[:-1], now, index, newest)
        reason = "recovery" if scan.torn else "start"
        return OpenPlan(
            position, [(fmt.FILE_START, file_intro(position, prev_file, reason)), *intro]
        )
    assert scan.first is not None and scan.last_seq is not None and scan.last_hash is not None
    first_seq = scan.first_seq or scan.last_seq
    checkpoint_from = max((scan.last_checkpoint or 0) + 1, first_seq)
    position = Position(
        path=newest,
        index=index,
        size=scan.good_end,
        file_started=float(scan.first.get("ts", now)),
        file_first_seq=first_seq,
        seq=scan.last_seq,
        head=scan.last_hash,
        chain=scan.chain or "",
        checkpoint_from=checkpoint_from,
        since_checkpoint=scan.last_seq - checkpoint_from + 1,
        last_checkpoint_ts=now,
        ts=scan.last_ts or now,
    )
    if not intro:
        intro.append((fmt.RESUMED, {"file": newest.name, "cause": "restart"}))
    return OpenPlan(position, intro)
