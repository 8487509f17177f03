"""The chain's next line: a record built, encoded and hashed onto a position (no I/O)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.recording import format as fmt
from proxy.recording.keys import Signer
from proxy.recording.recovery import Position


def next_line(
    pos: Position, signer: Signer, kind: str, fields: dict[str, Any], now: float
) -> tuple[Position, bytes]:
    """``(the position after it, the line)``; a value JSON cannot hold raises here."""
    ts = max(fmt.micros(now), pos.ts)
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
    line = fmt.encode_record(record)
    sealed = kind == fmt.CHECKPOINT
    after = Position(  # spelled out: _replace costs more than the rest of the record
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
    return after, line


def rotation_due(pos: Position, now: float, rotate_bytes: int, rotate_seconds: float) -> str | None:
    """Why the next record starts a new file ("size", "age"), or None; never an empty one."""
    if pos.seq <= pos.file_first_seq:
        return None
    if pos.size >= rotate_bytes:
        return "size"
    if now - pos.file_started >= rotate_seconds:
        return "age"
    return None


def next_file(pos: Position, path: Path, index: int, now: float) -> Position:
    """Where the chain continues after a rotation: a new, empty file."""
    return pos._replace(
        path=path,
        index=index,
        size=0,
        file_started=now,
        file_first_seq=pos.seq + 1,
        checkpoint_from=pos.seq + 1,
    )
