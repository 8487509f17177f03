"""Verify bearer JWTs strictly: pinned algorithms, required and type-checked claims.

PyJWT accepts a token without ``exp`` unless told otherwise and accepts numeric strings
for time claims, so both are checked here before PyJWT sees the token. Key lookup is by
``kid`` in a configured key set only: ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

MAX_KID_LENGTH = 128
MAX_CACHED_TOKENS = 4096
_KID = re.compile(r"^[A-Za-z0-9._:+/=-]{1,128}$")
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})


class IdentityError(Exception):
    """The token is not acceptable; ``reason`` is safe to show (no token bytes)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysUnavailable(Exception):
    """No verification keys at all (issuer unreachable, nothing cached): refuse with 503."""


@dataclass(frozen=True, slots=True)
class Identity:
    subject: str
    groups: tuple[str, ...]
    session: str
    token_id: str | None
    issuer: str | None
    expires_at: float | None

    def to_event(self) -> dict[str, Any]:
        return {"subject": self.subject, "groups": list(self.groups), "session": self.session}


ANONYMOUS = Identity("anonymous", (), "anonymous", None, None, None)

#: ``keys(kid, refetch)``: the verification key for ``kid`` (None if unknown); with
#: ``refetch`` the source may reload its key set first (rate-limited by the source).
KeyLookup = Callable[[str | None, bool], Awaitable[Any]]


def extract_token(authorization: str | None) -> str | None:
    """Bearer, or the password of Basic auth for clients that only speak Basic."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None


def claim_at(payload: Mapping[str, Any], dotted: str) -> Any:
    """``realm_access.roles`` style lookups into nested claims."""
    value: Any = payload
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_claim_types(payload: Mapping[str, Any]) -> None:
    for name in ("exp", "iat"):
        if name not in payload:
            raise IdentityError(f"token has no {name} claim")
        if not _is_number(payload[name]):
            raise IdentityError(f"token claim {name} must be a number")
    if "nbf" in payload and not _is_number(payload["nbf"]):
        raise IdentityError("token claim nbf must be a number")
    for name in ("iss", "sub"):
        if not isinstance(payload.get(name), str) or not payload[name]:
            raise IdentityError(f"token claim {name} must be a non-empty string")
    aud = payload.get("aud")
    if not (
        isinstance(aud, str)
        or (isinstance(aud, list) and aud and all(isinstance(item, str) for item in aud))
    ):
        raise IdentityError("token claim aud must be a string or a list of strings")
    for name in ("jti", "sid"):
        if name in payload and not isinstance(payload[name], str):
            raise IdentityError(f"token claim {name} must be a string")


def session_id(subject: str, payload: Mapping[str, Any]) -> str:
    """Subject plus the token's ``sid`` (or ``jti``): short, stable, not the token."""
    anchor = payload.get("sid") or payload.get("jti") or ""
    digest = hashlib.sha256(f"{subject}\x00{anchor}".encode()).hexdigest()[:12]
    return f"{subject}/{digest}"


class TokenVerifier:
    def __init__(
        self,
        *,
        keys: KeyLookup,
        issuer: str,
        audience: str,
        algorithms: Sequence[str],
        groups_claim: str = "groups",
        leeway: float = 30.0,
        max_token_size: int = 8192,
        cache_seconds: float = 60.0,
    ) -> None:
        algorithms = list(algorithms)
        if not algorithms or not set(algorithms) <= ASYMMETRIC_ALGORITHMS:
            raise ValueError("only asymmetric JWT algorithms may be configured")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.algorithms = algorithms
        self.groups_claim = groups_claim
        self.leeway = leeway
        self.max_token_size = max_token_size
        self.cache_seconds = cache_seconds
        self._verified: OrderedDict[str, tuple[Identity, float]] = OrderedDict()

    async def verify(self, token: str) -> Identity:
        """A verified token is remembered until its exp (at most ``cache_seconds``), so a
        busy agent pays for one signature check, not one per request."""
        now = time.time()
        hit = self._verified.get(token)
        if hit is not None and now < hit[1]:
            identity, _, kid, key = hit
            # The key must still be the one that verified it: rotation, removal and a
            # provider gone past its staleness bound all end the cached verdict.
            if await self.keys(kid, False) is key:
                return identity
            del self._verified[token]
        identity, kid, key = await self._verify(token)
        if identity.expires_at is not None:
            until = min(identity.expires_at, now + self.cache_seconds)
            self._verified[token] = (identity, until, kid, key)
            if len(self._verified) > MAX_CACHED_TOKENS:
                self._verified.popitem(last=False)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, str | None, Any]:
        if len(token) > self.max_token_size:
            raise IdentityError("token is too large")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise IdentityError("token is malformed") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise IdentityError("token algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not _KID.match(kid)):
            raise IdentityError("token key id is invalid")
        check_claim_types(unverified)
        if unverified.get("iss") != self.issuer:
            raise IdentityError("token issuer is not trusted")
        key = await self.keys(kid, False)
        if key is None:
            raise IdentityError("token is signed by an unknown key")
        try:
            payload = self._decode(token, key, algorithm)
        except jwt.InvalidSignatureError:
            # A token without a kid after a key rotation: reload the key set once.
            fresh = await self.keys(kid, True)
            if fresh is None or fresh is key:
                raise IdentityError("token signature or claims are invalid") from None
            key = fresh
            payload = self._decode_checked(token, key, algorithm)
        except jwt.PyJWTError as exc:
            raise _identity_error(exc) from None
        return self._identity(payload), kid, key

    def _decode_checked(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        try:
            return self._decode(token, key, algorithm)
        except jwt.PyJWTError as exc:
            raise _identity_error(exc) from None

    def _decode(self, token: str, key: Any, algorithm: str) -> dict[str, Any]:
        return jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=self.audience,
            issuer=self.issuer,
            leeway=self.leeway,
            options={
                "require": ["exp", "iat", "iss", "aud", "sub"],
                "verify_jti": False,
                "verify_sub": True,
            },
        )

    def _identity(self, payload: Mapping[str, Any]) -> Identity:
        subject = str(payload["sub"])
        raw_groups = claim_at(payload, self.groups_claim)
        if isinstance(raw_groups, str):
            groups: tuple[str, ...] = (raw_groups,)
        elif isinstance(raw_groups, list):
            groups = tuple(item for item in raw_groups if isinstance(item, str))
        else:
            groups = ()
        exp = payload.get("exp")
        return Identity(
            subject=subject,
            groups=groups,
            session=session_id(subject, payload),
            token_id=payload.get("jti"),
            issuer=payload.get("iss"),
            expires_at=float(exp) if _is_number(exp) else None,
        )


def _identity_error(exc: Exception) -> IdentityError:
    """A reason safe to show: which check failed, never the token."""
    if isinstance(exc, jwt.ExpiredSignatureError):
        return IdentityError("token has expired")
    if isinstance(exc, jwt.ImmatureSignatureError):
        return IdentityError("token is not valid yet")
    if isinstance(exc, jwt.InvalidAudienceError):
        return IdentityError("token audience does not match")
    if isinstance(exc, jwt.InvalidIssuerError):
        return IdentityError("token issuer is not trusted")
    return IdentityError("token signature or claims are invalid")
