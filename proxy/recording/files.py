"""Recording files on disk: names, listing, line scanning, and private, link-proof I/O.

Files are ``<dir>/<YYYYmmddTHHMMSSZ>-<index>.jsonl`` (0600 in a 0700 directory), ordered
by index, which only grows (clocks can step back; indexes cannot). Side files share the
name: ``.idx`` (reader index cache) and ``.broken`` (copy kept before a torn tail is cut).
Sidecar bodies are ``<dir>/blobs/<sha256>``.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

BLOBS_DIR = "blobs"
SUFFIX = ".jsonl"
_NAME = re.compile(r"^(\d{8}T\d{6}Z)-(\d{6,})\.jsonl$")
_CHUNK = 1 << 22


class UnsafePath(Exception):
    """A path is a symlink or not what it should be; the recorder refuses to use it."""


def file_name(ts: float, index: int) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts)) + f"-{index:06d}{SUFFIX}"


def file_index(path: Path | str) -> int | None:
    match = _NAME.match(Path(path).name)
    return int(match.group(2)) if match else None


def list_recordings(directory: Path) -> list[Path]:
    """Regular recording files in ``directory``, oldest (lowest index) first."""
    found: list[tuple[int, Path]] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            index = file_index(entry.name)
            if index is not None and entry.is_file(follow_symlinks=False):
                found.append((index, Path(entry.path)))
    return [path for _, path in sorted(found)]


def planted_links(directory: Path) -> list[str]:
    """Recording-named symlinks: someone is trying to redirect our writes."""
    with os.scandir(directory) as entries:
        return [e.name for e in entries if file_index(e.name) is not None and e.is_symlink()]


def ensure_private_dir(path: Path) -> Path:
    """Create 0700 if missing; refuse a symlink or a non-directory; tighten loose modes."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePath(f"{path.name} is a symlink; refusing to use it")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{path.name} is not a directory")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_append(path: Path) -> tuple[int, int, bool]:
    """``(fd, size, created)`` for appending; never through a link, always 0600."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        created = True
    except FileExistsError:
        fd = os.open(path, flags)
        created = False
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafePath(f"{path.name} is not a regular file")
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd, info.st_size, created


def open_read(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_new_private(path: Path, data: bytes) -> None:
    """Write a new 0600 file atomically (temp + rename) and fsync it; links are refused."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)


def copy_private(source: Path, target: Path) -> None:
    """A byte-for-byte 0600 copy (the ``.broken`` evidence), fsynced."""
    src = open_read(source)
    dst = os.open(
        target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        while chunk := os.read(src, _CHUNK):
            write_all(dst, chunk)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def broken_name(path: Path) -> Path:
    """``<file>.broken``, or ``<file>.<n>.broken`` when earlier copies exist."""
    candidate = path.with_name(path.name + ".broken")
    n = 1
    while candidate.exists() or candidate.is_symlink():
        candidate = path.with_name(f"{path.name}.{n}.broken")
        n += 1
    return candidate


def iter_lines(path: Path, start: int = 0) -> Iterator[tuple[int, bytes, bool]]:
    """``(offset, line without newline, complete)`` from ``start``; the last may be partial."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        offset, rest = start, b""
        os.lseek(fd, start, os.SEEK_SET)
        while chunk := os.read(fd, _CHUNK):
            parts = (rest + chunk).split(b"\n") if rest else chunk.split(b"\n")
            rest = parts.pop()
            for line in parts:
                yield offset, line, True
                offset += len(line) + 1
        if rest:
            yield offset, rest, False
    finally:
        os.close(fd)


def first_line(path: Path, limit: int = 1 << 20) -> bytes | None:
    """The first complete line (without newline), if it fits in ``limit`` bytes."""
    with open(path, "rb") as handle:
        line = handle.readline(limit)
    return line[:-1] if line.endswith(b"\n") else None


def last_line(path: Path) -> tuple[int, bytes] | None:
    """``(offset, line)`` of the last complete line (ignores a partial tail)."""
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        pos, buf = end, b""
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            handle.seek(pos)
            buf = handle.read(step) + buf
            cut = buf.rfind(b"\n")
            if cut < 0:
                continue
            prior = buf.rfind(b"\n", 0, cut)
            if prior >= 0 or pos == 0:
                return pos + prior + 1, buf[prior + 1 : cut]
    return None
