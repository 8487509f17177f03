"""The state directory: private to the user, never followed through a symlink."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from pathlib import Path

ADMIN_TOKEN_FILE = "admin.token"


class StateError(Exception):
    """The state directory or a file in it is unsafe or unusable."""


def ensure_state_dir(path: Path) -> Path:
    """Create the directory 0700 if missing; refuse a symlink or a group/world-writable one."""
    path = Path(path)
    if path.is_symlink():
        raise StateError(f"state dir {path} is a symlink; refusing to use it")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"state dir {path} is not a directory")
    if info.st_mode & 0o022:
        os.chmod(path, 0o700)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Create a 0600 file that did not exist; never follow or overwrite a planted link."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_private_file(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise StateError(f"{path} is a symlink; refusing to read it") from None
        raise StateError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if info.st_mode & 0o077:
            raise StateError(f"{path} is readable by others (mode {oct(info.st_mode & 0o777)})")
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def load_or_create_admin_token(state_dir: Path) -> str:
    """The bearer token consoles present to the admin API, created on first start."""
    path = ensure_state_dir(state_dir) / ADMIN_TOKEN_FILE
    with contextlib.suppress(FileExistsError):
        write_private_file(path, (secrets.token_urlsafe(32) + "\n").encode())
    token = read_private_file(path).decode().strip()
    if len(token) < 32:
        raise StateError(f"{path} holds no usable token")
    return token


def tokens_equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())
