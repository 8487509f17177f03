"""The aiohttp side of identity and credentials: fetchers, and per-config caches.

Verifiers and credential providers hold caches (JWKS, minted tokens) that must survive
reloads of unrelated settings, so they are rebuilt only when their own section changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config import (
    CommandCredentialModel,
    Config,
    JwtCredentialModel,
    OAuth2CredentialModel,
    StaticCredentialModel,
)
from proxy.credentials import (
    CommandCredential,
    CredentialProvider,
    JwtCredential,
    OAuth2ClientCredentials,
    StaticCredential,
)
from proxy.identity import ANONYMOUS, Identity, IdentityError, TokenVerifier, extract_token
from proxy.identity.local import LocalIssuer
from proxy.identity.oidc import OidcKeys, check_fetch_url

log = logging.getLogger("sluice.identity")
MAX_FETCH_BYTES = 1 << 20
_MISSING = object()
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


class HttpFetcher:
    """Small JSON GETs and form POSTs toward identity providers and token endpoints."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def fetch_json(self, url: str) -> Any:
        check_fetch_url(url)
        async with self.session.get(
            url,
            timeout=FETCH_TIMEOUT,
            allow_redirects=False,
            headers={"Accept": "application/json"},
        ) as reply:
            if reply.status != 200:
                raise ValueError(f"{url} answered {reply.status}")
            body = await reply.content.read(MAX_FETCH_BYTES + 1)
            if len(body) > MAX_FETCH_BYTES:
                raise ValueError(f"{url} sent more than {MAX_FETCH_BYTES} bytes")
            return json.loads(body)

    async def post_form(
        self, url: str, form: Mapping[str, str], headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        check_fetch_url(url)
        async with self.session.post(
            url,
            data=dict(form),
            headers=dict(headers),
            timeout=FETCH_TIMEOUT,
            allow_redirects=False,
        ) as reply:
            return reply.status, await reply.content.read(MAX_FETCH_BYTES)


class IdentityGate:
    """Authenticates agents (and approvers) under whichever config is current."""

    def __init__(self, state_dir: Path, fetcher: HttpFetcher) -> None:
        self.state_dir = state_dir
        self.fetcher = fetcher
        self._verifiers: dict[str, TokenVerifier | None] = {}
        self._credentials: dict[str, dict[str, CredentialProvider]] = {}
        self.local_issuer: LocalIssuer | None = None
        # Per-request lookups by config digest; the content keys above only run on reload.
        self._verifier_by_digest: dict[str, TokenVerifier | None] = {}
        self._credentials_by_digest: dict[str, dict[str, CredentialProvider]] = {}

    def verifier(self, config: Config) -> TokenVerifier | None:
        fast = self._verifier_by_digest.get(config.digest, _MISSING)
        if fast is not _MISSING:
            return fast  # type: ignore[return-value]
        key = config.identity.model_dump_json()  # same section, same verifier (and caches)
        if key not in self._verifiers:
            self._verifiers = {key: self._build_verifier(config)}
        self._verifier_by_digest = {config.digest: self._verifiers[key]}
        return self._verifiers[key]

    def _build_verifier(self, config: Config) -> TokenVerifier | None:
        identity = config.identity
        if identity.mode == "none":
            return None
        if identity.mode == "local":
            self.local_issuer = LocalIssuer(
                self.state_dir, issuer=identity.effective_issuer, audience=identity.audience
            )
            keys: Any = self.local_issuer.key_for
        else:
            assert identity.issuer is not None
            keys = OidcKeys(
                identity.issuer,
                self.fetcher.fetch_json,
                algorithms=identity.effective_algorithms,
                discovery_url=identity.discovery_url,
                jwks_url=identity.jwks_url,
                refresh=identity.jwks_refresh,
                max_stale=identity.jwks_max_stale,
                cooldown=identity.jwks_cooldown,
            ).key_for
        return TokenVerifier(
            keys=keys,
            issuer=identity.effective_issuer,
            audience=identity.audience,
            algorithms=identity.effective_algorithms,
            groups_claim=identity.groups_claim,
            leeway=identity.leeway,
            max_token_size=identity.max_token_size,
        )

    async def authenticate(self, config: Config, authorization: str | None) -> Identity:
        """The caller's identity; IdentityError (401) or KeysUnavailable (503) otherwise."""
        verifier = self.verifier(config)
        if verifier is None:
            return ANONYMOUS
        token = extract_token(authorization)
        if token is None:
            raise IdentityError("a bearer token is required")
        return await verifier.verify(token)

    def jwks(self, config: Config) -> dict[str, Any] | None:
        self.verifier(config)
        if config.identity.mode != "local" or self.local_issuer is None:
            return None
        return self.local_issuer.jwks()

    def credentials(self, config: Config) -> dict[str, CredentialProvider]:
        fast = self._credentials_by_digest.get(config.digest)
        if fast is not None:
            return fast
        key = json.dumps(
            {name: model.model_dump() for name, model in config.credentials.items()},
            sort_keys=True,
            default=str,
        ) + str(config.path.parent)
        if key not in self._credentials:
            base = config.path.parent
            self._credentials = {
                key: {
                    name: self._provider(name, model, base)
                    for name, model in config.credentials.items()
                }
            }
        self._credentials_by_digest = {config.digest: self._credentials[key]}
        return self._credentials[key]

    def _provider(self, name: str, model: Any, base: Path) -> CredentialProvider:
        def resolve(path: str | None) -> Path | None:
            if path is None:
                return None
            candidate = Path(path).expanduser()
            return candidate if candidate.is_absolute() else base / candidate

        if isinstance(model, StaticCredentialModel):
            return StaticCredential(
                name, model.header, model.format, env=model.env, file=resolve(model.file)
            )
        if isinstance(model, JwtCredentialModel):
            key_file = resolve(model.key_file)
            assert key_file is not None
            return JwtCredential(
                name,
                model.header,
                model.format,
                key_file=key_file,
                algorithm=model.algorithm,
                ttl=model.ttl,
                issuer=model.issuer,
                audience=model.audience,
            )
        if isinstance(model, OAuth2CredentialModel):
            return OAuth2ClientCredentials(
                name,
                model.header,
                model.format,
                token_url=model.token_url,
                client_id=model.client_id,
                secret_env=model.client_secret_env,
                secret_file=resolve(model.client_secret_file),
                scope=model.scope,
                audience=model.audience,
                auth_method=model.auth_method,
                post_form=self.fetcher.post_form,
            )
        assert isinstance(model, CommandCredentialModel)
        return CommandCredential(
            name, model.header, model.format, argv=model.argv, timeout=model.timeout, ttl=model.ttl
        )
