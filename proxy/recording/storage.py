"""Sidecar bodies and retention: the blocking file work the recorder runs off the event loop.

Bodies above the inline limit are stored once under their SHA-256 in ``<dir>/blobs``
(0600, written to a temp name, fsynced, renamed, directory fsynced) *before* the record
that references them is written, so a durable record never points at a missing blob.
Retention deletes whole files by age (never the newest or the one being written) and
then the blobs nothing references any more.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from pathlib import Path

from proxy.recording.files import (
    BLOBS_DIR,
    UnsafePath,
    file_index,
    fsync_dir,
    iter_lines,
    list_recordings,
    write_new_private,
)

_BLOB_REF = re.compile(rb'"blob":"([0-9a-f]{64})"')
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def store_blob(blobs: Path, data: bytes) -> str:
    """Write ``data`` as ``blobs/<sha256>`` unless an identical blob exists; returns the digest."""
    digest = hashlib.sha256(data).hexdigest()
    path = blobs / digest
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"blob {digest[:16]} is not a regular file")
        if info.st_size == len(data):
            os.utime(path, follow_symlinks=False)  # still in use: keep it through retention
            return digest
    write_new_private(path, data)
    fsync_dir(blobs)
    return digest


def load_blob(blobs: Path, digest: str) -> bytes:
    """A sidecar body, checked against its name; never read through a link."""
    if not _DIGEST.match(digest):
        raise ValueError("not a blob digest")
    fd = os.open(blobs / digest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"blob {digest[:16]} does not match its hash")
    return data


def clean_temp_blobs(blobs: Path) -> None:
    """Temp files left by a crash mid-write; their records were never written."""
    with os.scandir(blobs) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def referenced_blobs(directory: Path) -> set[str]:
    found: set[str] = set()
    for path in list_recordings(directory):
        for _, line, _complete in iter_lines(path):
            if b'"blob":"' in line:
                found.update(m.group(1).decode() for m in _BLOB_REF.finditer(line))
    return found


def apply_retention(directory: Path, now: float, keep_seconds: float, current: Path) -> list[str]:
    """Delete recordings (and their side files) last written before ``now - keep_seconds``."""
    cutoff = now - keep_seconds
    files = list_recordings(directory)
    keep_from = file_index(current) or 0
    deleted: list[str] = []
    for path in files[:-1]:
        if (file_index(path) or 0) >= keep_from or os.lstat(path).st_mtime >= cutoff:
            continue
        for side in [path, path.with_name(path.name + ".idx")]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(side)
        for broken in directory.glob(glob_escape(path.name) + "*.broken"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(broken)
        deleted.append(path.name)
    if not deleted:
        return deleted
    fsync_dir(directory)
    blobs = directory / BLOBS_DIR
    if blobs.is_dir() and not blobs.is_symlink():
        used = referenced_blobs(directory)
        with os.scandir(blobs) as entries:
            for entry in entries:
                if entry.name in used or not _DIGEST.match(entry.name):
                    continue
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
        fsync_dir(blobs)
    return deleted


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)
