"""OIDC discovery and JWKS caching, sans-IO: the server layer injects ``fetch_json``.

Keys are fetched asynchronously (never blocking the event loop), cached, refreshed after
``refresh``, kept last-good for at most ``max_stale`` when the provider is down, and
refetched at most once per ``cooldown`` when a token names an unknown ``kid``, so key
rotation works without a restart and a flood of bogus kids cannot hammer the provider.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import jwt

from proxy.identity.tokens import KeysUnavailable

log = logging.getLogger("sluice.identity")

FetchJson = Callable[[str], Awaitable[Any]]


def check_fetch_url(url: str) -> str:
    """https only; plain http only to loopback (for tests and local providers)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return url
    if parts.scheme == "http" and _is_loopback(host):
        return url
    raise ValueError(f"only https URLs (or http on loopback) may be fetched, not {url!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OidcKeys:
    def __init__(
        self,
        issuer: str,
        fetch_json: FetchJson,
        *,
        algorithms: Sequence[str],
        discovery_url: str | None = None,
        jwks_url: str | None = None,
        refresh: float = 600.0,
        max_stale: float = 3600.0,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.fetch_json = fetch_json
        self.algorithms = frozenset(algorithms)
        self.discovery_url = check_fetch_url(
            discovery_url or f"{self.issuer}/.well-known/openid-configuration"
        )
        self.jwks_url = check_fetch_url(jwks_url) if jwks_url else None
        self.refresh = refresh
        self.max_stale = max_stale
        self.cooldown = cooldown
        self.clock = clock
        self._keys: dict[str | None, Any] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._inflight: asyncio.Future[None] | None = None
        self.last_error: str | None = None
        self.fetches = 0

    async def key_for(self, kid: str | None, refetch: bool = False) -> Any:
        now = self.clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.refresh
        unknown = kid not in self._keys
        if (stale or unknown or refetch) and self._may_fetch(now):
            await self._fetch_once()
        now = self.clock()
        if self._fetched_at is None or now - self._fetched_at >= self.max_stale:
            raise KeysUnavailable(self.last_error or "no identity provider keys available")
        return self._keys.get(kid)

    def _may_fetch(self, now: float) -> bool:
        if self._inflight is not None:
            return True
        return self._attempted_at is None or now - self._attempted_at >= self.cooldown

    async def _fetch_once(self) -> None:
        """Single flight: concurrent callers share one fetch."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(lambda _: setattr(self, "_inflight", None))
        await asyncio.shield(self._inflight)

    async def _fetch(self) -> None:
        self._attempted_at = self.clock()
        self.fetches += 1
        try:
            jwks_url = self.jwks_url
            if jwks_url is None:
                document = await self.fetch_json(self.discovery_url)
                if (
                    not isinstance(document, dict)
                    or document.get("issuer", "").rstrip("/") != self.issuer
                ):
                    raise ValueError("discovery document names another issuer")
                jwks_url = check_fetch_url(str(document.get("jwks_uri", "")))
            keys = self._parse(await self.fetch_json(jwks_url))
        except Exception as exc:  # any failure keeps the last good keys
            self.last_error = f"cannot fetch identity provider keys: {type(exc).__name__}"
            log.warning("%s (%s)", self.last_error, exc)
            return
        self._keys = keys
        self._fetched_at = self.clock()
        self.last_error = None

    def _parse(self, document: Any) -> dict[str | None, Any]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise ValueError("JWKS document has no keys list")
        keys: dict[str | None, Any] = {}
        for entry in document["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") == "oct":
                continue  # never accept a symmetric key from a key set
            try:
                jwk = jwt.PyJWK.from_dict(entry)
            except jwt.PyJWTError:
                continue
            if entry.get("alg") and entry["alg"] not in self.algorithms:
                continue
            keys[jwk.key_id] = jwk.key
        if not keys:
            raise ValueError("JWKS document has no usable signing keys")
        if len(keys) == 1:
            keys[None] = next(iter(keys.values()))
        return keys
