"""The Ed25519 key that seals checkpoints, and the public keys verifiers check them with.

The private key lives in the state directory (0600, created on first use, never followed
through a symlink). Its public half is copied beside the recordings as
``recording-key.pub`` so a verifier finds it; a replaced key is kept as
``recording-key.<key id prefix>.pub`` so older files still verify. A key found beside the
recordings only proves that nobody edited a file *without also* re-signing it: for real
assurance a verifier pins the key (``--public-key``) obtained out of band.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from proxy.state import ensure_state_dir, read_private_file, write_private_file

SIGNING_KEY_FILE = "recording-signing.pem"
PUBLIC_KEY_FILE = "recording-key.pub"


class KeyFileError(Exception):
    """A key file is missing, unreadable or not an Ed25519 key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 (hex) of the raw 32-byte public key: what checkpoints name."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Signer:
    """The private key and its id; ``sign`` is what checkpoints call."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())


def load_or_create_signing_key(path: Path) -> Signer:
    """Create the key 0600 on first use; refuse a symlink or a key others can read."""
    path = Path(path)
    ensure_state_dir(path.parent)
    if not path.exists() and not path.is_symlink():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with contextlib.suppress(FileExistsError):
            write_private_file(path, pem)
    key = serialization.load_pem_private_key(read_private_file(path), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path.name} is not an Ed25519 private key")
    return Signer(key)


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise KeyFileError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError("not an Ed25519 public key")
    return key


def load_public_key_file(path: Path) -> Ed25519PublicKey:
    try:
        return load_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None


def publish_public_key(directory: Path, signer: Signer) -> None:
    """Write ``recording-key.pub`` (atomically); keep a replaced key under its id."""
    target = Path(directory) / PUBLIC_KEY_FILE
    pem = public_pem(signer.public_key)
    if target.is_symlink():
        raise KeyFileError(f"{target.name} is a symlink; refusing to replace it")
    if target.exists():
        old = target.read_bytes()
        if old == pem:
            return
        with contextlib.suppress(KeyFileError):
            keep = target.with_name(f"recording-key.{key_id(load_public_key(old))[:16]}.pub")
            if not keep.exists():
                os.link(target, keep)
    tmp = target.with_name(f".{PUBLIC_KEY_FILE}.{secrets.token_hex(6)}")
    write_private_file(tmp, pem)
    os.replace(tmp, target)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def directory_public_keys(directory: Path) -> dict[str, Ed25519PublicKey]:
    """Every ``recording-key*.pub`` beside the recordings, by key id."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in sorted(Path(directory).glob("recording-key*.pub")):
        with contextlib.suppress(KeyFileError, OSError):
            key = load_public_key(path.read_bytes())
            keys[key_id(key)] = key
    return keys


def signature_valid(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True
