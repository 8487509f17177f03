"""Just-in-time upstream credentials: the agent never holds a static secret.

Each provider yields the header Sluice adds toward the upstream. Providers cache what
they obtain and renew it before expiry; any failure raises ``CredentialUnavailable`` and
the request is refused (503), never forwarded without its credential. HTTP for OAuth2 is
injected (``post_form``) so this module stays free of aiohttp.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote_plus

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.identity import Identity
from proxy.state import StateError, ensure_state_dir, read_private_file, write_private_file

log = logging.getLogger("sluice.credentials")

PostForm = Callable[[str, Mapping[str, str], Mapping[str, str]], Awaitable[tuple[int, bytes]]]


class CredentialUnavailable(Exception):
    """The credential cannot be obtained; ``reason`` never contains secret material."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"credential {name}: {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Injected:
    header: str
    value: str
    secret: str  # the raw token, so recordings and events can redact it


class CredentialProvider(Protocol):
    name: str

    async def obtain(self, identity: Identity, target: str) -> Injected: ...


@dataclass
class _Cached:
    token: str
    expires_at: float
    renew_at: float = 0.0

    def __post_init__(self) -> None:
        # Renew a fifth of the lifetime early, at most 30 s early, so even short-lived
        # tokens are reused for most of their life.
        lifetime = max(0.0, self.expires_at - time.time())
        self.renew_at = self.expires_at - min(30.0, lifetime / 5)


class _Base:
    def __init__(self, name: str, header: str, template: str) -> None:
        self.name = name
        self.header = header
        self.template = template
        self._cache: dict[Any, _Cached] = {}
        self._locks: dict[Any, asyncio.Lock] = {}

    def _wrap(self, token: str) -> Injected:
        if not token or any(char in token for char in "\r\n\x00"):
            raise CredentialUnavailable(self.name, "obtained an empty or malformed token")
        return Injected(self.header, self.template.replace("{token}", token), token)

    async def _cached(self, key: Any, fetch: Callable[[], Awaitable[_Cached]]) -> Injected:
        """Reuse a token until shortly before it expires; one fetch per key at once."""
        entry = self._cache.get(key)
        if entry is not None and time.time() < entry.renew_at:
            return self._wrap(entry.token)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._cache.get(key)
            if entry is None or time.time() >= entry.renew_at:
                entry = await fetch()
                self._cache[key] = entry
                if len(self._cache) > 10000:
                    self._cache.pop(next(iter(self._cache)))
        return self._wrap(entry.token)


class StaticCredential(_Base):
    """A long-lived secret from the environment or a file, injected by Sluice only."""

    def __init__(
        self, name: str, header: str, template: str, *, env: str | None, file: Path | None
    ) -> None:
        super().__init__(name, header, template)
        self.env = env
        self.file = file

    async def obtain(self, identity: Identity, target: str) -> Injected:
        if self.env is not None:
            value = os.environ.get(self.env, "").strip()
            if not value:
                raise CredentialUnavailable(self.name, f"environment variable {self.env} is unset")
            return self._wrap(value)
        assert self.file is not None
        try:
            value = self.file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CredentialUnavailable(
                self.name, f"cannot read {self.file}: {exc.strerror}"
            ) from None
        return self._wrap(value)


def load_or_create_jwt_key(path: Path, algorithm: str) -> Any:
    """The signing key for minted upstream JWTs; created 0600 (with a .pub.pem) if missing."""
    if not path.exists():
        ensure_state_dir(path.parent)
        key: Any = (
            Ed25519PrivateKey.generate()
            if algorithm == "EdDSA"
            else ec.generate_private_key(ec.SECP256R1())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_private_file(path, pem)
            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            path.with_suffix(".pub.pem").write_bytes(public)
            log.info("created upstream signing key %s (public key beside it)", path)
            return key
        except FileExistsError:
            pass
    return serialization.load_pem_private_key(read_private_file(path), password=None)


class JwtCredential(_Base):
    """A token minted per session: sub = the agent, aud = the target, short-lived."""

    def __init__(
        self,
        name: str,
        header: str,
        template: str,
        *,
        key_file: Path,
        algorithm: str,
        ttl: float,
        issuer: str,
        audience: str | None,
    ) -> None:
        super().__init__(name, header, template)
        self.key_file = key_file
        self.algorithm = algorithm
        self.ttl = ttl
        self.issuer = issuer
        self.audience = audience
        self._key: Any = None

    async def obtain(self, identity: Identity, target: str) -> Injected:
        return await self._cached((identity.session, target), lambda: self._mint(identity, target))

    async def _mint(self, identity: Identity, target: str) -> _Cached:
        try:
            if self._key is None:
                self._key = load_or_create_jwt_key(self.key_file, self.algorithm)
            now = int(time.time())
            payload = {
                "iss": self.issuer,
                "sub": identity.subject,
                "aud": self.audience or target,
                "iat": now,
                "nbf": now,
                "exp": now + int(self.ttl),
                "jti": secrets.token_hex(16),
                "sid": identity.session,
            }
            token = jwt.encode(payload, self._key, algorithm=self.algorithm)
        except (OSError, ValueError, TypeError, StateError, jwt.PyJWTError) as exc:
            raise CredentialUnavailable(self.name, f"cannot sign: {type(exc).__name__}") from None
        return _Cached(token, float(now + int(self.ttl)))


class OAuth2ClientCredentials(_Base):
    """RFC 6749 4.4: one token for the whole proxy, refreshed before ``expires_in``."""

    def __init__(
        self,
        name: str,
        header: str,
        template: str,
        *,
        token_url: str,
        client_id: str,
        secret_env: str | None,
        secret_file: Path | None,
        scope: str | None,
        audience: str | None,
        auth_method: str,
        post_form: PostForm | None,
        attempts: int = 3,
        backoff: Sequence[float] = (0.2, 0.5, 1.0),
    ) -> None:
        super().__init__(name, header, template)
        self.token_url = token_url
        self.client_id = client_id
        self.secret_env = secret_env
        self.secret_file = secret_file
        self.scope = scope
        self.audience = audience
        self.auth_method = auth_method
        self.post_form = post_form
        self.attempts = attempts
        self.backoff = backoff
        self.fetches = 0

    async def obtain(self, identity: Identity, target: str) -> Injected:
        return await self._cached("client", self._fetch)

    def _secret(self) -> str:
        if self.secret_env:
            value = os.environ.get(self.secret_env, "")
        else:
            assert self.secret_file is not None
            try:
                value = self.secret_file.read_text(encoding="utf-8")
            except OSError:
                value = ""
        if not value.strip():
            raise CredentialUnavailable(self.name, "client secret is not available")
        return value.strip()

    async def _fetch(self) -> _Cached:
        if self.post_form is None:
            raise CredentialUnavailable(self.name, "no HTTP client configured")
        import base64

        secret = self._secret()
        form = {"grant_type": "client_credentials"}
        headers = {"Accept": "application/json"}
        if self.scope:
            form["scope"] = self.scope
        if self.audience:
            form["audience"] = self.audience
        if self.auth_method == "basic":
            # RFC 6749 2.3.1: both halves are form-urlencoded before Basic encoding.
            pair = f"{quote_plus(self.client_id)}:{quote_plus(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        else:
            form.update(client_id=self.client_id, client_secret=secret)
        last = "no attempt made"
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(self.backoff[min(attempt - 1, len(self.backoff) - 1)])
            self.fetches += 1
            try:
                status, body = await self.post_form(self.token_url, form, headers)
            except Exception as exc:  # network errors are retried, then reported by type only
                last = f"token endpoint unreachable ({type(exc).__name__})"
                continue
            if status >= 500 or status == 429:
                last = f"token endpoint answered {status}"
                continue
            if status != 200:
                raise CredentialUnavailable(self.name, f"token endpoint refused ({status})")
            return self._parse(body)
        raise CredentialUnavailable(self.name, last)

    def _parse(self, body: bytes) -> _Cached:
        try:
            document = json.loads(body)
            token = document["access_token"]
            expires_in = float(document.get("expires_in", 300))
        except (ValueError, KeyError, TypeError):
            raise CredentialUnavailable(self.name, "token endpoint sent no access_token") from None
        if not isinstance(token, str):
            raise CredentialUnavailable(self.name, "token endpoint sent no access_token")
        return _Cached(token, time.time() + expires_in)


class CommandCredential(_Base):
    """Run a program (argv, no shell, timeout) printing a token or JSON {token, expires_at}."""

    def __init__(
        self,
        name: str,
        header: str,
        template: str,
        *,
        argv: Sequence[str],
        timeout: float,
        ttl: float,
    ) -> None:
        super().__init__(name, header, template)
        self.argv = list(argv)
        self.timeout = timeout
        self.ttl = ttl
        self.runs = 0

    async def obtain(self, identity: Identity, target: str) -> Injected:
        return await self._cached("command", self._run)

    async def _run(self) -> _Cached:
        self.runs += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            raise CredentialUnavailable(
                self.name, f"cannot run {self.argv[0]}: {exc.strerror}"
            ) from None
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), self.timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise CredentialUnavailable(self.name, f"{self.argv[0]} timed out") from None
        if process.returncode != 0:
            raise CredentialUnavailable(self.name, f"{self.argv[0]} exited {process.returncode}")
        return self._parse(stdout.decode("utf-8", "replace").strip())

    def _parse(self, output: str) -> _Cached:
        expires_at = time.time() + self.ttl
        token = output
        if output.startswith("{"):
            try:
                document = json.loads(output)
                token = str(document["token"])
                if document.get("expires_at") is not None:
                    expires_at = _parse_time(document["expires_at"])
            except (ValueError, KeyError, TypeError):
                raise CredentialUnavailable(self.name, "command printed malformed JSON") from None
        else:
            token = output.splitlines()[0].strip() if output else ""
        return _Cached(token, expires_at)


def _parse_time(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
