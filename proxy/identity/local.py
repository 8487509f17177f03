"""Sluice as its own token issuer, so a solo user needs no identity provider.

The Ed25519 signing key lives in the state dir (0600) and is created on first use; its
public half is published as a JWKS on the admin listener.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy.state import ensure_state_dir, read_private_file, write_private_file

LOCAL_KEY_FILE = "identity-signing.pem"
LOCAL_ALGORITHM = "EdDSA"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(public: Ed25519PublicKey) -> dict[str, str]:
    """The public key as a JWK, its ``kid`` the RFC 7638 thumbprint."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    members = {"crv": "Ed25519", "kty": "OKP", "x": _b64url(raw)}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    kid = _b64url(hashlib.sha256(canonical).digest())
    return {**members, "kid": kid, "alg": LOCAL_ALGORITHM, "use": "sig"}


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    ensure_state_dir(path.parent)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_private_file(path, pem)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            return key
    loaded = serialization.load_pem_private_key(read_private_file(path), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return loaded


class LocalIssuer:
    def __init__(self, state_dir: Path, *, issuer: str, audience: str) -> None:
        self.key = load_or_create_signing_key(Path(state_dir) / LOCAL_KEY_FILE)
        self.public_key = self.key.public_key()
        self.jwk = public_jwk(self.public_key)
        self.kid = self.jwk["kid"]
        self.issuer = issuer
        self.audience = audience

    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.jwk]}

    def issue(
        self,
        subject: str,
        groups: Sequence[str],
        ttl: float,
        *,
        groups_claim: str = "groups",
        now: float | None = None,
    ) -> str:
        issued = int(now if now is not None else time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(ttl),
            "jti": secrets.token_hex(12),
        }
        _set_claim(payload, groups_claim, list(groups))
        return jwt.encode(payload, self.key, algorithm=LOCAL_ALGORITHM, headers={"kid": self.kid})

    async def key_for(self, kid: str | None, refetch: bool = False) -> Ed25519PublicKey | None:
        return self.public_key if kid in (None, self.kid) else None


def _set_claim(payload: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = payload
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
