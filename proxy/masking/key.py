"""The per-install fingerprint key: same secret, same fingerprint, and no way back."""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from proxy.state import ensure_state_dir, read_private_file, write_private_file

MASK_KEY_FILE = "mask.key"


def load_or_create_mask_key(state_dir: Path) -> bytes:
    """32 random bytes in ``<state_dir>/mask.key`` (0600), created on first use."""
    path = ensure_state_dir(state_dir) / MASK_KEY_FILE
    with contextlib.suppress(FileExistsError):
        write_private_file(path, secrets.token_bytes(32))
    key = read_private_file(path)
    if len(key) < 32:
        raise ValueError(f"{path} is too short to be a key")
    return key
