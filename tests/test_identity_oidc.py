"""Identity mode "oidc" against a real OpenID Connect provider on 127.0.0.1.

The provider is ``oidc_provider_mock`` (Flask + Authlib) served by werkzeug in a thread,
bound to 127.0.0.1 so its issuer is ``http://127.0.0.1:PORT``. Tokens come from its
authorization-code flow, driven with httpx. A WSGI wrapper counts every request the
provider receives, so JWKS fetches by the proxy can be counted exactly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import flask
import httpx
import oidc_provider_mock
import pytest
import tomli_w
import werkzeug.serving
from aiohttp import web
from authlib import jose
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from helpers import LOOPBACK, client_session, config_text, json_of, running_proxy, upstream_app
from oidc_provider_mock import _app as oidc_app

from proxy.server.runtime import ProxyRuntime

# Authlib warns about its own deprecated APIs, which the mock provider uses.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CLIENT_ID = "sluice-agents"
REDIRECT_URI = "http://127.0.0.1/callback"


# --------------------------------------------------------------------------- provider


@dataclass
class Provider:
    """A running oidc_provider_mock, its storage and a log of the paths it served."""

    wsgi: Any
    storage: Any = None
    paths: list[str] = field(default_factory=list)
    port: int = 0
    server: Any = None
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def jwks_fetches(self) -> int:
        return self.paths.count("/jwks")

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.paths.append(environ.get("PATH_INFO", ""))
        return self.wsgi(environ, start_response)

    def start(self) -> None:
        self.server = werkzeug.serving.make_server(LOOPBACK, self.port, self, threaded=True)
        self.port = self.server.server_port
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        assert self.thread is not None
        self.thread.join(5)
        self.server = None

    def rotate(self, kid: str | None = None) -> str:
        """A new RSA signing key in place of the old one; returns its kid."""
        options = {"kid": kid} if kid else None
        self.storage.jwk = jose.RSAKey.generate_key(is_private=True, options=options)
        return self.storage.jwk.as_dict()["kid"]

    def current_kid(self) -> str:
        return self.storage.jwk.as_dict()["kid"]


@contextlib.contextmanager
def provider_running(
    monkeypatch: pytest.MonkeyPatch, *, names_kid: bool = True
) -> Iterator[Provider]:
    """The provider, signing id_tokens with a ``kid`` header when ``names_kid``.

    Out of the box oidc_provider_mock publishes a kid in its JWKS but leaves it out of
    the id_token header; real providers (Keycloak, Entra, Okta, Auth0) name it, so that
    is patched in for the rotation tests.
    """
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain http on loopback
    monkeypatch.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)
    if names_kid:
        original = oidc_app.OpenIDCode.get_jwt_config

        def with_kid(self: Any, grant: Any, client: Any = None) -> dict[str, Any]:
            config = dict(original(self, grant, client))
            config["kid"] = config["key"]["kid"]
            return config

        monkeypatch.setattr(oidc_app.OpenIDCode, "get_jwt_config", with_kid)
    app = oidc_provider_mock.app()
    provider = Provider(app)

    @app.before_request
    def capture_storage() -> None:
        provider.storage = flask.g.oidc_provider_mock_storage

    provider.start()
    try:
        yield provider
    finally:
        provider.stop()


async def id_token(provider: Provider, sub: str, claims: dict[str, Any] | None = None) -> str:
    """Sign ``sub`` in through the authorization-code flow and return its id_token."""
    async with httpx.AsyncClient(base_url=provider.url, trust_env=False, timeout=10) as http:
        reply = await http.put(f"/users/{sub}", json=claims or {})
        assert reply.status_code == 204, reply.text
        query = {
            "client_id": CLIENT_ID,
            "redirect_uri": REDIRECT_URI,
            "response_type": "code",
            "scope": "openid profile",
            "state": secrets.token_hex(8),
            "nonce": secrets.token_hex(8),
        }
        reply = await http.post("/oauth2/authorize", params=query, data={"sub": sub})
        assert reply.status_code == 302, reply.text
        location = urlsplit(reply.headers["location"])
        assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT_URI
        code = parse_qs(location.query)["code"][0]
        reply = await http.post(
            "/oauth2/token",
            data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI},
            auth=(CLIENT_ID, "client-secret"),
        )
        assert reply.status_code == 200, reply.text
        token = reply.json()["id_token"]
    assert isinstance(token, str)
    return token


def unverified(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")

    def part(text: str) -> dict[str, Any]:
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))

    return part(head), part(body)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(issuer: str, kid: str, key: rsa.RSAPrivateKey) -> str:
    """Well-formed, right issuer and audience, signed by a key the provider never had."""
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "kid": kid}
    claims = {"iss": issuer, "aud": CLIENT_ID, "sub": "mallory", "iat": now, "exp": now + 300}
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(signature)


# --------------------------------------------------------------------------- proxy


@dataclass
class Upstream:
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append({"method": request.method, "headers": dict(request.headers)})
        return web.json_response({"ok": True})


def oidc_config(tmp_path: Path, provider: Provider, upstream: str, **identity: Any) -> Path:
    rules = [
        {
            "name": "builders-may-post",
            "target": "api",
            "method": "POST",
            "groups": ["builders"],
            "action": "allow",
        },
        {"name": "anyone-may-read", "target": "api", "method": "GET", "action": "allow"},
    ]
    document = tomllib.loads(config_text(tmp_path, upstreams={"api": upstream}, rules=rules))
    document["identity"] = {
        "mode": "oidc",
        "issuer": provider.url,
        "audience": CLIENT_ID,
        "groups_claim": "realm_access.roles",
        "algorithms": ["RS256"],
        **identity,
    }
    path = tmp_path / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


@dataclass
class Stack:
    runtime: ProxyRuntime
    provider: Provider
    upstream: Upstream
    client: Any

    async def call(self, token: str, method: str = "GET") -> tuple[int, dict[str, Any]]:
        async with self.client.request(
            method,
            f"{self.runtime.main_url}/api/work",
            headers={"Authorization": f"Bearer {token}"},
        ) as reply:
            return reply.status, await json_of(reply)


@contextlib.asynccontextmanager
async def oidc_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, names_kid: bool = True, **identity: Any
) -> AsyncIterator[Stack]:
    upstream = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    with provider_running(monkeypatch, names_kid=names_kid) as provider:
        async with upstream_app(app) as upstream_url:
            config = oidc_config(tmp_path, provider, upstream_url, **identity)
            async with running_proxy(config) as runtime, client_session() as client:
                yield Stack(runtime, provider, upstream, client)


BUILDER = {"realm_access": {"roles": ["builders", "readers"]}, "email": "ada@example.com"}
READER = {"realm_access": {"roles": ["readers"]}}


# --------------------------------------------------------------------------- tests


@pytest.mark.asyncio
async def test_provider_token_passes_and_groups_drive_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(tmp_path, monkeypatch, names_kid=False) as stack:
        ada = await id_token(stack.provider, "ada", BUILDER)
        bob = await id_token(stack.provider, "bob", READER)
        header, claims = unverified(ada)
        assert header["alg"] == "RS256"
        assert claims["iss"] == stack.provider.url
        assert CLIENT_ID in (claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]])
        assert claims["realm_access"]["roles"] == ["builders", "readers"]

        assert (await stack.call(ada))[0] == 200
        assert (await stack.call(ada, "POST"))[0] == 200
        assert (await stack.call(bob))[0] == 200
        status, body = await stack.call(bob, "POST")
        assert status == 403
        assert body["error"] == "denied"
        assert len(stack.upstream.seen) == 3
        # the agent's id_token is not forwarded to the upstream
        assert all("Authorization" not in seen["headers"] for seen in stack.upstream.seen)
        received = [
            (e.data["subject"], tuple(e.data["groups"]), e.data["method"])
            for e in stack.runtime.bus.since(0)[0]
            if e.type == "request.received"
        ]
        assert received == [
            ("ada", ("builders", "readers"), "GET"),
            ("ada", ("builders", "readers"), "POST"),
            ("bob", ("readers",), "GET"),
            ("bob", ("readers",), "POST"),
        ]
        assert stack.provider.jwks_fetches() == 1, "keys are cached"


@pytest.mark.asyncio
async def test_other_audience_and_tampered_groups_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(tmp_path, monkeypatch) as stack:
        bob = await id_token(stack.provider, "bob", READER)
        head, _, signature = bob.split(".")
        _, claims = unverified(bob)
        claims["realm_access"] = {"roles": ["builders"]}
        escalated = f"{head}.{b64url(json.dumps(claims).encode())}.{signature}"
        status, body = await stack.call(escalated, "POST")
        assert (status, body["error"]) == (401, "invalid_token")
        # a token the same provider issued to another client (audience) is refused too
        async with httpx.AsyncClient(base_url=stack.provider.url, trust_env=False) as http:
            query = {
                "client_id": "some-other-app",
                "redirect_uri": REDIRECT_URI,
                "response_type": "code",
                "scope": "openid",
            }
            reply = await http.post("/oauth2/authorize", params=query, data={"sub": "bob"})
            code = parse_qs(urlsplit(reply.headers["location"]).query)["code"][0]
            reply = await http.post(
                "/oauth2/token",
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": REDIRECT_URI,
                },
                auth=("some-other-app", "x"),
            )
            other = reply.json()["id_token"]
        status, body = await stack.call(other)
        assert (status, body["reason"]) == (401, "token audience does not match")
        assert stack.upstream.seen == []


@pytest.mark.asyncio
async def test_key_rotation_without_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(tmp_path, monkeypatch, jwks_cooldown="0.3s", jwks_refresh="10m") as stack:
        provider = stack.provider
        old = await id_token(provider, "ada", BUILDER)
        old_unused = await id_token(provider, "ada", BUILDER)  # never seen by the proxy
        assert unverified(old)[0]["kid"] == provider.current_kid()
        assert (await stack.call(old))[0] == 200
        assert provider.jwks_fetches() == 1

        new_kid = provider.rotate()
        new = await id_token(provider, "ada", BUILDER)
        assert unverified(new)[0]["kid"] == new_kid
        await asyncio.sleep(0.4)  # past the cooldown of the first fetch
        assert (await stack.call(new))[0] == 200, "unknown kid fetched the new key set"
        assert provider.jwks_fetches() == 2
        newer = await id_token(provider, "bob", READER)
        assert (await stack.call(newer))[0] == 200
        assert provider.jwks_fetches() == 2, "the new key is cached"
        # the retired key is gone from the set: a token it signed no longer passes
        status, body = await stack.call(old_unused)
        assert (status, body["reason"]) == (401, "token is signed by an unknown key")
        assert provider.jwks_fetches() <= 3


@pytest.mark.asyncio
async def test_key_rotation_without_kid_in_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(
        tmp_path, monkeypatch, names_kid=False, jwks_cooldown="0.3s", jwks_refresh="10m"
    ) as stack:
        old = await id_token(stack.provider, "ada", BUILDER)
        assert "kid" not in unverified(old)[0]
        assert (await stack.call(old))[0] == 200
        stack.provider.rotate()
        new = await id_token(stack.provider, "ada", BUILDER)
        await asyncio.sleep(0.4)
        status, body = await stack.call(new)
        assert status == 200, body


@pytest.mark.asyncio
async def test_burst_of_unknown_kids_fetches_keys_at_most_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(tmp_path, monkeypatch, jwks_cooldown="10s") as stack:
        provider = stack.provider
        attacker = rsa.generate_private_key(65537, 2048)

        async def burst() -> list[int]:
            tokens = [forged(provider.url, secrets.token_hex(8), attacker) for _ in range(50)]
            results = await asyncio.gather(*(stack.call(token) for token in tokens))
            return [status for status, _ in results]

        # cold: nothing cached yet, 50 unknown kids at once share one fetch
        assert set(await burst()) == {401}
        assert provider.jwks_fetches() == 1
        assert provider.paths.count("/.well-known/openid-configuration") == 1
        # the genuine key came with that fetch: a real token passes without another
        ada = await id_token(provider, "ada", BUILDER)
        assert (await stack.call(ada))[0] == 200
        # warm: another burst inside the cooldown fetches nothing
        assert set(await burst()) == {401}
        assert provider.jwks_fetches() == 1
        assert stack.upstream.seen and len(stack.upstream.seen) == 1


@pytest.mark.asyncio
async def test_unknown_kid_burst_after_cooldown_fetches_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(tmp_path, monkeypatch, jwks_cooldown="0.5s") as stack:
        provider = stack.provider
        ada = await id_token(provider, "ada", BUILDER)
        assert (await stack.call(ada))[0] == 200
        await asyncio.sleep(0.6)
        attacker = rsa.generate_private_key(65537, 2048)
        tokens = [forged(provider.url, secrets.token_hex(8), attacker) for _ in range(50)]
        results = await asyncio.gather(*(stack.call(token) for token in tokens))
        assert {status for status, _ in results} == {401}
        assert provider.jwks_fetches() <= 2


STALE_IDENTITY = {"jwks_refresh": "0.5s", "jwks_max_stale": "2s", "jwks_cooldown": "0.2s"}


@pytest.mark.asyncio
async def test_provider_down_uses_cached_keys_until_max_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fresh tokens each probe (the verifier also remembers tokens it already checked)."""
    caplog.set_level(logging.DEBUG, logger="sluice")
    async with oidc_stack(tmp_path, monkeypatch, **STALE_IDENTITY) as stack:
        provider = stack.provider
        tokens = [await id_token(provider, "ada", BUILDER) for _ in range(26)]
        assert len(set(tokens)) == len(tokens)
        assert (await stack.call(tokens.pop()))[0] == 200  # the first (and last) fetch
        fetched = time.monotonic()
        assert provider.jwks_fetches() == 1
        provider.stop()

        timeline: list[tuple[float, int, str]] = []
        while tokens and time.monotonic() - fetched < 4.0:
            status, body = await stack.call(tokens.pop())
            timeline.append((round(time.monotonic() - fetched, 2), status, body.get("error", "")))
            if status == 503:
                break
            await asyncio.sleep(0.12)
        statuses = [status for _, status, _ in timeline]
        assert statuses[-1] == 503, timeline
        assert timeline[-1][2] == "identity_unavailable"
        assert set(statuses[:-1]) == {200}, timeline
        last_ok = max(t for t, status, _ in timeline if status == 200)
        first_503 = timeline[-1][0]
        assert last_ok >= 1.6, f"stale keys were dropped too early: {timeline}"
        assert first_503 <= 3.0, f"stale keys kept past max_stale (2 s): {timeline}"
        assert any("cannot fetch identity provider keys" in r.getMessage() for r in caplog.records)

        # still refused while it stays down, fresh token or not
        await asyncio.sleep(0.3)
        assert (await stack.call(tokens.pop()))[0] == 503
        # the provider comes back on the same address with the same keys: 200 again
        provider.start()
        await asyncio.sleep(0.3)  # past the cooldown
        assert (await stack.call(tokens.pop()))[0] == 200
        assert all("Authorization" not in seen["headers"] for seen in stack.upstream.seen)


@pytest.mark.asyncio
async def test_provider_down_reused_token_refused_after_max_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with oidc_stack(tmp_path, monkeypatch, **STALE_IDENTITY) as stack:
        ada = await id_token(stack.provider, "ada", BUILDER)
        assert (await stack.call(ada))[0] == 200
        stack.provider.stop()
        await asyncio.sleep(2.3)  # past jwks_max_stale
        status, body = await stack.call(ada)
        assert status == 503, body
