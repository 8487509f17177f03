"""Just-in-time credentials end to end: each kind against an upstream that checks it.

The agent authenticates to Sluice with its own token (identity mode "local"); Sluice
obtains the upstream credential (static, minted JWT, OAuth2 client credentials, command)
and injects it. The upstream is a real aiohttp server on 127.0.0.1 that records every
header it received and verifies the credential itself. For every kind: the agent's
token never reaches the upstream, the agent cannot supply or override the injected
header, and the injected secret shows up in neither the answer, the events nor the logs.
A credential that cannot be obtained is a 503 ``credential_unavailable`` and nothing is
forwarded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import secrets
import stat
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import tomli_w
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import (
    client_session,
    closed_port_url,
    config_text,
    parse_raw_response,
    raw_exchange,
    running_proxy,
    upstream_app,
)

from proxy.server.runtime import ProxyRuntime

TARGET = "svc"
AGENT = "agent-7"

# --------------------------------------------------------------------------- servers


@dataclass
class Upstream:
    """Records the header pairs of every request; ``check`` decides 200 or 401."""

    check: Callable[[list[tuple[str, str]]], str | None] = lambda headers: None
    url: str = ""
    seen: list[list[tuple[str, str]]] = field(default_factory=list)

    def values(self, index: int, name: str) -> list[str]:
        return [v for k, v in self.seen[index] if k.lower() == name.lower()]

    async def handle(self, request: web.Request) -> web.Response:
        pairs = list(request.headers.items())
        self.seen.append(pairs)
        problem = self.check(pairs)
        if problem is not None:
            return web.json_response({"ok": False, "problem": problem}, status=401)
        return web.json_response({"ok": True, "path": request.path})


@contextlib.asynccontextmanager
async def serve_upstream(upstream: Upstream) -> AsyncIterator[Upstream]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", upstream.handle)
    async with upstream_app(app) as url:
        upstream.url = url
        yield upstream


def only(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in headers if k.lower() == name.lower()]
    return values[0] if len(values) == 1 else None


@dataclass
class TokenEndpoint:
    """RFC 6749 4.4 on loopback: Basic (or post) client auth, counts every call."""

    client_id: str
    client_secret: str
    expires_in: float = 2
    plan: list[int] = field(default_factory=list)  # statuses to answer before succeeding
    calls: list[float] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)
    forms: list[dict[str, str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(time.monotonic())
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.forms.append(form)
        if self.plan:
            status = self.plan.pop(0)
            return web.json_response({"error": "temporarily_unavailable"}, status=status)
        client = self._client(request, form)
        if client != (self.client_id, self.client_secret):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        token = f"oat-{len(self.issued)}-{secrets.token_hex(12)}"
        self.issued.append(token)
        return web.json_response(
            {"access_token": token, "token_type": "Bearer", "expires_in": self.expires_in}
        )

    @staticmethod
    def _client(request: web.Request, form: dict[str, str]) -> tuple[str, str] | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "basic":
            user, _, password = base64.b64decode(value).decode().partition(":")
            return user, password
        if "client_id" in form:
            return form["client_id"], form.get("client_secret", "")
        return None


@contextlib.asynccontextmanager
async def serve_token_endpoint(endpoint: TokenEndpoint) -> AsyncIterator[TokenEndpoint]:
    app = web.Application()
    app.router.add_post("/oauth/token", endpoint.handle)
    async with upstream_app(app) as url:
        endpoint.url = url + "/oauth/token"
        yield endpoint


# --------------------------------------------------------------------------- proxy


def credential_config(
    tmp_path: Path, upstream: str, credential: dict[str, Any], *, name: str = "cred"
) -> Path:
    targets = [{"name": TARGET, "upstream": upstream, "credential": name}]
    document = tomllib.loads(config_text(tmp_path, targets=targets))
    document["identity"] = {"mode": "local", "audience": "sluice"}
    document["credentials"] = {name: credential}
    path = tmp_path / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


@dataclass
class Stack:
    runtime: ProxyRuntime
    upstream: Upstream
    client: Any
    agent_token: str

    def issue(self, subject: str = AGENT, groups: tuple[str, ...] = ("agents",)) -> str:
        assert self.runtime.gate is not None and self.runtime.gate.local_issuer is not None
        return self.runtime.gate.local_issuer.issue(subject, list(groups), 600)

    async def get(
        self, path: str = "/things", *, token: str | None = None
    ) -> tuple[int, dict[str, str], str]:
        """A request as a client library sends it (duplicate header names are merged)."""
        authorization = f"Bearer {token or self.agent_token}"
        async with self.client.get(
            f"{self.runtime.main_url}/{TARGET}{path}", headers={"Authorization": authorization}
        ) as reply:
            text = await reply.text()
            shown = "\n".join(f"{k}: {v}" for k, v in reply.headers.items())
            return reply.status, {"headers": shown}, text

    async def raw_get(self, *lines: str) -> tuple[int, dict[str, str], str]:
        """One request with exactly these extra header lines (duplicates kept as sent)."""
        host = self.runtime.main_url.removeprefix("http://")
        head = [
            f"GET /{TARGET}/raw HTTP/1.1",
            f"Host: {host}",
            f"Authorization: Bearer {self.agent_token}",
            *lines,
            "Connection: close",
        ]
        data = await raw_exchange(
            self.runtime.main_url, ("\r\n".join(head) + "\r\n\r\n").encode(), one_response=True
        )
        status, headers, body = parse_raw_response(data)
        shown = "\n".join(f"{k}: {v}" for k, v in headers.items())
        return status, {"headers": shown}, body.decode("utf-8", "replace")


@contextlib.asynccontextmanager
async def stack_for(
    tmp_path: Path, credential: dict[str, Any], upstream: Upstream | None = None
) -> AsyncIterator[Stack]:
    async with serve_upstream(upstream or Upstream()) as served:
        config = credential_config(tmp_path, served.url, credential)
        async with running_proxy(config) as runtime, client_session() as client:
            stack = Stack(runtime, served, client, "")
            stack.agent_token = stack.issue()
            yield stack


def capture_debug(caplog: pytest.LogCaptureFixture) -> None:
    for name in ("sluice", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)


def assert_secret_contained(
    secrets_: list[str],
    stack: Stack,
    caplog: pytest.LogCaptureFixture,
    answers: list[tuple[int, dict[str, str], str]],
) -> None:
    """No injected (or client) secret in what the agent saw, the events or the logs."""
    events = json.dumps([event.to_json() for event in stack.runtime.bus.since(0)[0]])
    logs = caplog.text + "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for secret in secrets_:
        assert secret
        for status, headers, body in answers:
            assert secret not in body, f"secret in the answer body ({status})"
            assert secret not in headers["headers"], "secret in the answer headers"
        assert secret not in events, "secret in the events"
        assert secret not in logs, "secret in the logs"


def assert_agent_token_not_forwarded(stack: Stack, tokens: list[str]) -> None:
    for pairs in stack.upstream.seen:
        flat = "\n".join(f"{k}: {v}" for k, v in pairs)
        for token in tokens:
            assert token not in flat, "the agent's own token reached the upstream"
            for part in token.split("."):
                assert part not in flat


async def assert_unavailable(stack: Stack) -> tuple[int, dict[str, str], str]:
    answer = await stack.get()
    status, _, body = answer
    assert status == 503, body
    document = json.loads(body)
    assert document["error"] == "credential_unavailable"
    assert TARGET in document["reason"]
    assert stack.upstream.seen == [], "forwarded without its credential"
    completed = [e for e in stack.runtime.bus.since(0)[0] if e.type == "request.completed"]
    assert completed[-1].data["code"] == "credential_unavailable"
    assert not any(e.type == "request.forwarded" for e in stack.runtime.bus.since(0)[0])
    return answer


# --------------------------------------------------------------------------- static


@pytest.mark.asyncio
async def test_static_from_env_replaces_the_agent_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    secret = "st-" + secrets.token_urlsafe(24)
    monkeypatch.setenv("SLUICE_TEST_STATIC", secret)
    upstream = Upstream(
        lambda h: None if only(h, "Authorization") == f"Bearer {secret}" else "bad credential"
    )
    credential = {"kind": "static", "env": "SLUICE_TEST_STATIC"}
    async with stack_for(tmp_path, credential, upstream) as stack:
        answers = [
            await stack.get(),
            # the agent tries to bring its own upstream credential next to its Sluice
            # token, in several spellings (raw bytes: HTTP clients merge duplicates)
            await stack.raw_get("authorization: Bearer agent-chosen"),
            await stack.raw_get("AUTHORIZATION: Basic YWdlbnQ6Y2hvc2Vu", "Authorization: x"),
        ]
        assert [a[0] for a in answers] == [200, 200, 200], answers
        for index in range(3):
            assert stack.upstream.values(index, "Authorization") == [f"Bearer {secret}"]
        assert_agent_token_not_forwarded(stack, [stack.agent_token])
        assert_secret_contained([secret], stack, caplog, answers)


@pytest.mark.asyncio
async def test_static_custom_header_cannot_be_overridden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    secret = "key-" + secrets.token_hex(20)
    monkeypatch.setenv("SLUICE_TEST_API_KEY", secret)
    upstream = Upstream(lambda h: None if only(h, "X-Api-Key") == secret else "bad key")
    credential = {
        "kind": "static",
        "env": "SLUICE_TEST_API_KEY",
        "header": "X-Api-Key",
        "format": "{token}",
    }
    async with stack_for(tmp_path, credential, upstream) as stack:
        answer = await stack.raw_get("X-Api-Key: agent-key", "x-api-key: agent-key-2")
        assert answer[0] == 200, answer
        assert stack.upstream.values(0, "X-Api-Key") == [secret]
        # the agent's own Sluice token is not forwarded even though the credential
        # travels in another header
        assert stack.upstream.values(0, "Authorization") == []
        assert_agent_token_not_forwarded(stack, [stack.agent_token])
        assert_secret_contained([secret], stack, caplog, [answer])


@pytest.mark.asyncio
async def test_static_from_file_is_reread(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    capture_debug(caplog)
    first, second = "file-" + secrets.token_hex(16), "file-" + secrets.token_hex(16)
    secret_file = tmp_path / "secrets" / "upstream-token"
    secret_file.parent.mkdir()
    secret_file.write_text(first + "\n", encoding="utf-8")
    credential = {"kind": "static", "file": "secrets/upstream-token"}  # relative to config
    async with stack_for(tmp_path, credential) as stack:
        answers = [await stack.get()]
        secret_file.write_text(second + "\n", encoding="utf-8")
        answers.append(await stack.get())
        assert [a[0] for a in answers] == [200, 200]
        assert stack.upstream.values(0, "Authorization") == [f"Bearer {first}"]
        assert stack.upstream.values(1, "Authorization") == [f"Bearer {second}"]
        secret_file.unlink()
        answers.append(await assert_unavailable_after(stack, 2))
        assert_secret_contained([first, second], stack, caplog, answers)


async def assert_unavailable_after(stack: Stack, forwarded: int) -> Any:
    answer = await stack.get()
    assert answer[0] == 503, answer
    assert json.loads(answer[2])["error"] == "credential_unavailable"
    assert len(stack.upstream.seen) == forwarded
    return answer


@pytest.mark.asyncio
async def test_static_env_unset_is_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    monkeypatch.delenv("SLUICE_TEST_UNSET", raising=False)
    async with stack_for(tmp_path, {"kind": "static", "env": "SLUICE_TEST_UNSET"}) as stack:
        await assert_unavailable(stack)
        monkeypatch.setenv("SLUICE_TEST_UNSET", "   ")  # blank is as good as unset
        assert (await stack.get())[0] == 503
        assert stack.upstream.seen == []


# --------------------------------------------------------------------------- jwt


def jwt_checker(pub_path: Path, algorithm: str, ttl: int) -> Callable[[Any], str | None]:
    def check(headers: list[tuple[str, str]]) -> str | None:
        value = only(headers, "Authorization") or ""
        if not value.startswith("Bearer "):
            return "no bearer credential"
        try:
            public = pub_path.read_bytes()
            claims = jwt.decode(
                value.removeprefix("Bearer "),
                public,
                algorithms=[algorithm],
                audience=TARGET,
                issuer="sluice",
                options={"require": ["exp", "iat", "sub", "aud", "jti", "iss"]},
            )
        except (OSError, jwt.PyJWTError) as exc:
            return f"invalid credential: {type(exc).__name__}"
        if claims["exp"] - claims["iat"] > ttl:
            return "lives longer than the configured ttl"
        return None

    return check


def minted(stack: Stack, index: int) -> dict[str, Any]:
    value = stack.upstream.values(index, "Authorization")[0].removeprefix("Bearer ")
    return jwt.decode(value, options={"verify_signature": False})


@pytest.mark.asyncio
@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_jwt_minted_per_session_and_renewed(
    algorithm: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    key_file = tmp_path / "keys" / "upstream.pem"
    pub_file = tmp_path / "keys" / "upstream.pub.pem"
    upstream = Upstream(jwt_checker(pub_file, algorithm, 2))
    credential = {
        "kind": "jwt",
        "key_file": "keys/upstream.pem",
        "algorithm": algorithm,
        "ttl": "2s",
    }
    async with stack_for(tmp_path, credential, upstream) as stack:
        answers = [await stack.get(), await stack.get()]
        assert [a[0] for a in answers] == [200, 200], answers
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert pub_file.exists()
        first, again = minted(stack, 0), minted(stack, 1)
        assert first["sub"] == AGENT and first["aud"] == TARGET
        assert first["exp"] - first["iat"] <= 2
        assert again["jti"] == first["jti"], "reused within its lifetime"
        # another session of the same subject and another subject: their own tokens
        other_session = stack.issue(AGENT)
        other_agent = stack.issue("agent-9")
        answers += [await stack.get(token=other_session), await stack.get(token=other_agent)]
        assert [a[0] for a in answers[2:]] == [200, 200]
        second, third = minted(stack, 2), minted(stack, 3)
        assert second["sub"] == AGENT and third["sub"] == "agent-9"
        assert len({first["jti"], second["jti"], third["jti"]}) == 3
        assert len({first["sid"], second["sid"], third["sid"]}) == 3
        # renewed before it expires: after the lifetime a fresh token is presented
        await asyncio.sleep(2.1)
        answers.append(await stack.get())
        assert answers[-1][0] == 200, answers[-1]
        renewed = minted(stack, 4)
        assert renewed["jti"] != first["jti"]
        assert renewed["sid"] == first["sid"]
        assert renewed["iat"] > first["iat"]
        assert time.time() < renewed["exp"] + 1
        injected = [stack.upstream.values(i, "Authorization")[0][7:] for i in range(5)]
        assert_agent_token_not_forwarded(stack, [stack.agent_token, other_session, other_agent])
        assert_secret_contained(injected, stack, caplog, answers)


@pytest.mark.asyncio
async def test_jwt_agent_cannot_override(tmp_path: Path) -> None:
    pub_file = tmp_path / "keys" / "upstream.pub.pem"
    upstream = Upstream(jwt_checker(pub_file, "ES256", 300))
    credential = {"kind": "jwt", "key_file": "keys/upstream.pem"}
    async with stack_for(tmp_path, credential, upstream) as stack:
        forged = jwt.encode({"sub": "root", "aud": TARGET}, "x" * 32, algorithm="HS256")
        answer = await stack.raw_get(f"Authorization: Bearer {forged}")
        assert answer[0] == 200, answer
        assert len(stack.upstream.values(0, "Authorization")) == 1
        assert minted(stack, 0)["sub"] == AGENT


@pytest.mark.asyncio
@pytest.mark.parametrize("problem", ["not-a-key", "directory"])
async def test_jwt_unusable_key_is_503(
    problem: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    key_file = tmp_path / "keys" / "upstream.pem"
    key_file.parent.mkdir(mode=0o700)
    if problem == "directory":
        key_file.mkdir(mode=0o700)
    else:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        os.close(fd)
    async with stack_for(tmp_path, {"kind": "jwt", "key_file": str(key_file)}) as stack:
        await assert_unavailable(stack)


@pytest.mark.asyncio
async def test_jwt_key_readable_by_others_is_503(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "upstream.pem"
    key_file.parent.mkdir(mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o644)  # a key others can read: refused, so the request must be too
    async with stack_for(tmp_path, {"kind": "jwt", "key_file": str(key_file)}) as stack:
        status, _, body = await stack.get()
        assert stack.upstream.seen == []  # never forwarded either way
        assert status == 503, body
        assert json.loads(body)["error"] == "credential_unavailable"


# --------------------------------------------------------------------------- oauth2


def oauth2_credential(endpoint: TokenEndpoint, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "oauth2_client_credentials",
        "token_url": endpoint.url,
        "client_id": endpoint.client_id,
        "client_secret_env": "SLUICE_TEST_CLIENT_SECRET",
        "scope": "read write",
        **extra,
    }


def bearer_from(endpoint: TokenEndpoint) -> Callable[[Any], str | None]:
    def check(headers: list[tuple[str, str]]) -> str | None:
        value = only(headers, "Authorization") or ""
        if not endpoint.issued or value != f"Bearer {endpoint.issued[-1]}":
            return "not the current access token"
        return None

    return check


@contextlib.asynccontextmanager
async def oauth2_stack(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    endpoint: TokenEndpoint,
    **extra: Any,
) -> AsyncIterator[Stack]:
    monkeypatch.setenv("SLUICE_TEST_CLIENT_SECRET", endpoint.client_secret)
    async with serve_token_endpoint(endpoint):
        credential = oauth2_credential(endpoint, **extra)
        async with stack_for(tmp_path, credential, Upstream(bearer_from(endpoint))) as stack:
            yield stack


def new_endpoint(**kwargs: Any) -> TokenEndpoint:
    return TokenEndpoint("sluice-client", "cs-" + secrets.token_urlsafe(24), **kwargs)


@pytest.mark.asyncio
async def test_oauth2_short_lived_token_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = new_endpoint(expires_in=2)
    async with oauth2_stack(tmp_path, monkeypatch, endpoint) as stack:
        for _ in range(3):
            assert (await stack.get())[0] == 200
        assert len(endpoint.calls) == 1, f"{len(endpoint.calls)} token requests for 3 calls"


@pytest.mark.asyncio
async def test_oauth2_cached_then_refreshed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """expires_in 2 s: reused for the first 1.6 s (renewed a fifth of its life early)."""
    capture_debug(caplog)
    endpoint = new_endpoint(expires_in=2)
    async with oauth2_stack(tmp_path, monkeypatch, endpoint) as stack:
        answers = [await stack.get() for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 200], answers
        assert len(endpoint.calls) == 1
        assert endpoint.forms[0]["grant_type"] == "client_credentials"
        assert endpoint.forms[0]["scope"] == "read write"
        assert "client_secret" not in endpoint.forms[0]  # Basic auth by default
        await asyncio.sleep(1.8)
        answers.append(await stack.get())
        assert answers[-1][0] == 200, answers[-1]
        assert len(endpoint.calls) == 2
        assert stack.upstream.values(3, "Authorization") == [f"Bearer {endpoint.issued[1]}"]
        assert_agent_token_not_forwarded(stack, [stack.agent_token])
        assert_secret_contained([*endpoint.issued, endpoint.client_secret], stack, caplog, answers)


@pytest.mark.asyncio
async def test_oauth2_post_client_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    endpoint = new_endpoint(expires_in=300)
    async with oauth2_stack(tmp_path, monkeypatch, endpoint, auth_method="post") as stack:
        answer = await stack.raw_get("Authorization: Bearer agent-override")
        assert answer[0] == 200, answer
        assert endpoint.forms[0]["client_id"] == endpoint.client_id
        assert stack.upstream.values(0, "Authorization") == [f"Bearer {endpoint.issued[0]}"]
        assert_secret_contained(
            [endpoint.issued[0], endpoint.client_secret], stack, caplog, [answer]
        )


@pytest.mark.asyncio
async def test_oauth2_server_error_is_retried_with_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = new_endpoint(expires_in=300, plan=[500, 503])
    async with oauth2_stack(tmp_path, monkeypatch, endpoint) as stack:
        answer = await stack.get()
        assert answer[0] == 200, answer
        assert len(endpoint.calls) == 3
        gaps = [b - a for a, b in itertools.pairwise(endpoint.calls)]
        assert gaps[0] >= 0.18 and gaps[1] >= 0.45, gaps  # 0.2 s, then 0.5 s
        assert len(stack.upstream.seen) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("plan", "calls"), [([500, 500, 500], 3), ([429, 502, 500], 3), ([401], 1), ([400], 1)]
)
async def test_oauth2_failure_is_503_never_forwarded(
    plan: list[int],
    calls: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    capture_debug(caplog)
    endpoint = new_endpoint(expires_in=300, plan=list(plan))
    async with oauth2_stack(tmp_path, monkeypatch, endpoint) as stack:
        answer = await assert_unavailable(stack)
        assert len(endpoint.calls) == calls
        assert_secret_contained([endpoint.client_secret], stack, caplog, [answer])


@pytest.mark.asyncio
async def test_oauth2_wrong_client_secret_and_unreachable_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = new_endpoint(expires_in=300)
    async with serve_token_endpoint(endpoint):
        monkeypatch.setenv("SLUICE_TEST_CLIENT_SECRET", "not-the-secret")
        (tmp_path / "a").mkdir()
        async with stack_for(tmp_path / "a", oauth2_credential(endpoint)) as stack:
            await assert_unavailable(stack)
    assert len(endpoint.calls) == 1 and endpoint.issued == []
    unreachable = new_endpoint()
    unreachable.url = closed_port_url() + "/oauth/token"
    (tmp_path / "b").mkdir()
    async with stack_for(tmp_path / "b", oauth2_credential(unreachable)) as stack:
        await assert_unavailable(stack)


# --------------------------------------------------------------------------- command


def command(code: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "command", "argv": [sys.executable, "-c", code], **extra}


@pytest.mark.asyncio
async def test_command_plain_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    capture_debug(caplog)
    secret = "tok-" + secrets.token_hex(16)
    counter = tmp_path / "runs"
    code = (
        f"import pathlib; p = pathlib.Path({str(counter)!r}); "
        f"p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else '1'); "
        f"print({secret!r})"
    )
    upstream = Upstream(lambda h: None if only(h, "Authorization") == f"Bearer {secret}" else "bad")
    async with stack_for(tmp_path, command(code), upstream) as stack:
        answers = [
            await stack.get(),
            await stack.raw_get("Authorization: Bearer agent-override"),
        ]
        assert [a[0] for a in answers] == [200, 200], answers
        assert counter.read_text() == "1", "the token is cached for its ttl"
        for index in range(2):
            assert stack.upstream.values(index, "Authorization") == [f"Bearer {secret}"]
        assert_agent_token_not_forwarded(stack, [stack.agent_token])
        assert_secret_contained([secret], stack, caplog, answers)


@pytest.mark.asyncio
async def test_command_json_with_expiry_is_renewed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    code = (
        "import json, secrets, time; "
        "print(json.dumps({'token': 'tok-' + secrets.token_hex(16), "
        "'expires_at': time.time() + 2}))"
    )
    seen: list[str] = []

    def check(headers: list[tuple[str, str]]) -> str | None:
        value = only(headers, "Authorization") or ""
        seen.append(value)
        return None if value.startswith("Bearer tok-") else "bad"

    # ttl "2s" puts the renewal margin at 0.4 s (ttl / 5), so the 2 s token is reused
    async with stack_for(tmp_path, command(code, ttl="2s"), Upstream(check)) as stack:
        answers = [await stack.get(), await stack.get()]
        assert seen[0] == seen[1]
        await asyncio.sleep(2.1)
        answers.append(await stack.get())
        assert [a[0] for a in answers] == [200, 200, 200], answers
        assert seen[2] != seen[0], "renewed after expires_at"
        assert_secret_contained(
            [value.removeprefix("Bearer ") for value in seen], stack, caplog, answers
        )


SHORT_EXPIRY_CODE = (
    "import json, pathlib, secrets, sys, time; p = pathlib.Path(sys.argv[1]); "
    "p.write_text(str(int(p.read_text()) + 1) if p.exists() else '1'); "
    "print(json.dumps({'token': 'tok-' + secrets.token_hex(8), 'expires_at': time.time() + 20}))"
)


@pytest.mark.asyncio
async def test_command_short_expires_at_is_reused(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    credential = {
        "kind": "command",
        "argv": [sys.executable, "-c", SHORT_EXPIRY_CODE, str(runs)],
    }
    async with stack_for(tmp_path, credential) as stack:
        for _ in range(3):
            assert (await stack.get())[0] == 200
        assert runs.read_text() == "1", f"command ran {runs.read_text()} times for 3 requests"


@pytest.mark.asyncio
async def test_command_iso_expiry(tmp_path: Path) -> None:
    code = (
        "import json; print(json.dumps({'token': 'tok-iso', 'expires_at': '2099-01-01T00:00:00Z'}))"
    )
    async with stack_for(tmp_path, command(code)) as stack:
        assert (await stack.get())[0] == 200
        assert stack.upstream.values(0, "Authorization") == ["Bearer tok-iso"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("label", "code", "extra"),
    [
        ("exit-status", "import sys; print('tok-leaked-on-failure'); sys.exit(3)", {}),
        ("timeout", "import time; time.sleep(30); print('tok-late')", {"timeout": "0.5s"}),
        ("empty-output", "pass", {}),
        ("malformed-json", "print('{\"token\": ')", {}),
        ("json-without-token", "print('{\"expires_at\": 1}')", {}),
        ("newline-in-token", "import json; print(json.dumps({'token': 'a\\r\\nX-Evil: 1'}))", {}),
    ],
)
async def test_command_failure_is_503_never_forwarded(
    label: str,
    code: str,
    extra: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    capture_debug(caplog)
    async with stack_for(tmp_path, command(code, **extra)) as stack:
        started = time.monotonic()
        answer = await assert_unavailable(stack)
        assert time.monotonic() - started < 5
        assert_secret_contained(["tok-leaked-on-failure", "tok-late"], stack, caplog, [answer])


@pytest.mark.asyncio
async def test_command_missing_program_is_503(tmp_path: Path) -> None:
    credential = {"kind": "command", "argv": [str(tmp_path / "no-such-program")]}
    async with stack_for(tmp_path, credential) as stack:
        await assert_unavailable(stack)


# --------------------------------------------------------------------------- all kinds


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["static", "jwt", "oauth2_client_credentials", "command"])
async def test_every_kind_hides_the_agent_token_and_its_secret(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same contract for each kind, with the credential in a custom header."""
    capture_debug(caplog)
    endpoint = new_endpoint(expires_in=300)
    monkeypatch.setenv("SLUICE_TEST_CLIENT_SECRET", endpoint.client_secret)
    monkeypatch.setenv("SLUICE_TEST_ALL", "static-" + secrets.token_hex(16))
    command_secret = "cmd-" + secrets.token_hex(16)
    base = {"header": "X-Upstream-Auth", "format": "Token {token}"}
    credentials: dict[str, dict[str, Any]] = {
        "static": {"kind": "static", "env": "SLUICE_TEST_ALL"},
        "jwt": {"kind": "jwt", "key_file": "keys/all.pem"},
        "command": command(f"print({command_secret!r})"),
    }
    async with serve_token_endpoint(endpoint):
        credentials["oauth2_client_credentials"] = oauth2_credential(endpoint)
        async with stack_for(tmp_path, {**credentials[kind], **base}) as stack:
            answers = [
                await stack.raw_get(
                    "X-Upstream-Auth: Token agent-chosen",
                    "x-upstream-auth: Token agent-chosen-2",
                    f"Proxy-Authorization: Bearer {stack.agent_token}",
                )
            ]
            assert answers[0][0] == 200, answers
            values = stack.upstream.values(0, "X-Upstream-Auth")
            assert len(values) == 1 and values[0].startswith("Token ")
            assert "agent-chosen" not in values[0]
            assert stack.upstream.values(0, "Authorization") == []
            assert stack.upstream.values(0, "Proxy-Authorization") == []
            injected = values[0].removeprefix("Token ")
            expected = {
                "static": os.environ["SLUICE_TEST_ALL"],
                "command": command_secret,
                "oauth2_client_credentials": endpoint.issued[0] if endpoint.issued else "",
            }
            if kind in expected:
                assert injected == expected[kind]
            else:
                assert jwt.decode(injected, options={"verify_signature": False})["sub"] == AGENT
            assert_agent_token_not_forwarded(stack, [stack.agent_token])
            assert_secret_contained([injected, endpoint.client_secret], stack, caplog, answers)


@pytest.mark.asyncio
async def test_unauthenticated_agent_never_triggers_a_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No valid Sluice token: 401 before any credential is obtained or injected."""
    endpoint = new_endpoint(expires_in=300)
    async with oauth2_stack(tmp_path, monkeypatch, endpoint) as stack:
        status, _, _ = await stack.get(token="not-a-token")
        assert status == 401
        assert endpoint.calls == [] and stack.upstream.seen == []
