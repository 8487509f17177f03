"""Identity on the admin side: approver JWTs, the public JWKS, ``sluice token issue``.

The CLI runs as a user runs it (``python -m proxy ...`` in a subprocess); the proxy runs
in-process on 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import jwt
import pytest
import tomli_w
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from helpers import (
    LOOPBACK,
    admin_token,
    client_session,
    config_text,
    free_port,
    json_of,
    running_proxy,
    upstream_app,
)

import proxy
from proxy.identity.local import LOCAL_KEY_FILE, LocalIssuer

SOURCE_ROOT = Path(proxy.__file__).resolve().parent.parent
GATE_BUG = (
    "BUG proxy/server/runtime.py ProxyRuntime.start: AdminApi(...) is built without "
    "gate=self.gate, so AdminApi.gate is None: approver JWTs are never accepted (401) and "
    "/.well-known/jwks.json answers 404 'this proxy does not issue tokens'"
)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    return env


def sluice(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write_identity_config(
    tmp_path: Path,
    identity: dict[str, Any],
    *,
    upstream: str = "http://127.0.0.1:9",
    rules: list[dict[str, Any]] | None = None,
    proxy_section: dict[str, Any] | None = None,
) -> Path:
    kwargs: dict[str, Any] = {"upstreams": {"api": upstream}, "proxy": proxy_section}
    if rules is not None:
        kwargs["rules"] = rules
    document = tomllib.loads(config_text(tmp_path, **kwargs))
    document["identity"] = identity
    path = tmp_path / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


LOCAL = {"mode": "local", "approver_groups": ["approvers", "leads"], "token_ttl": "1h"}


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


async def health(url: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with client_session() as client, client.get(f"{url}/api/health", headers=headers) as r:
        return r.status, await json_of(r)


# --------------------------------------------------------------------------- admin API


@pytest.mark.asyncio
async def test_admin_token_is_the_local_operator(tmp_path: Path) -> None:
    async with running_proxy(write_identity_config(tmp_path, LOCAL)) as runtime:
        status, body = await health(runtime.admin_url, f"Bearer {admin_token(runtime)}")
        assert status == 200
        assert body["principal"] == "local-operator"
        assert body["identity"] == "local"


@pytest.mark.asyncio
async def test_approver_jwt_is_accepted_as_its_subject(tmp_path: Path) -> None:
    async with running_proxy(write_identity_config(tmp_path, LOCAL)) as runtime:
        issuer = runtime.gate.local_issuer  # type: ignore[union-attr]
        assert issuer is not None
        token = issuer.issue("grace", ["reviewers", "leads"], 600)
        status, body = await health(runtime.admin_url, f"Bearer {token}")
        assert status == 200, body
        assert body["principal"] == "grace"


@pytest.mark.asyncio
async def test_jwts_that_are_not_approvers_are_refused(tmp_path: Path) -> None:
    async with running_proxy(write_identity_config(tmp_path, LOCAL)) as runtime:
        issuer = runtime.gate.local_issuer  # type: ignore[union-attr]
        assert issuer is not None
        refused = {
            "no approver group": f"Bearer {issuer.issue('mallory', ['agents'], 600)}",
            "no groups": f"Bearer {issuer.issue('mallory', [], 600)}",
            "approver, but expired": "Bearer "
            + issuer.issue("grace", ["approvers"], 60, now=time.time() - 3600),
            "approver, as Basic": "Basic "
            + base64.b64encode(
                f"grace:{issuer.issue('grace', ['approvers'], 600)}".encode()
            ).decode(),
            "garbage": "Bearer not-a-token",
            "nothing": None,
        }
        for label, authorization in refused.items():
            status, body = await health(runtime.admin_url, authorization)
            assert status == 401, label
            assert body == {"error": "unauthorized", "reason": "a valid admin token is required"}
        # the agent-facing proxy still takes the agent's token: the refusal was about role
        async with client_session() as client:
            other = LocalIssuer(tmp_path / "elsewhere", issuer="sluice-local", audience="sluice")
            async with client.get(
                f"{runtime.main_url}/api/x",
                headers={"Authorization": f"Bearer {other.issue('x', ['approvers'], 60)}"},
            ) as reply:
                assert reply.status == 401  # signed by another installation's key


@pytest.mark.asyncio
async def test_no_approver_groups_means_no_jwt_on_the_admin_api(tmp_path: Path) -> None:
    config = write_identity_config(tmp_path, {"mode": "local"})
    async with running_proxy(config) as runtime:
        issuer = runtime.gate.local_issuer  # type: ignore[union-attr]
        assert issuer is not None
        token = issuer.issue("grace", ["approvers"], 600)
        assert (await health(runtime.admin_url, f"Bearer {token}"))[0] == 401


@pytest.mark.asyncio
async def test_jwks_is_public_and_verifies_a_cli_token(tmp_path: Path) -> None:
    config = write_identity_config(tmp_path, LOCAL)
    result = sluice("token", "issue", "--sub", "ci-bot", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    async with (
        running_proxy(config) as runtime,
        client_session() as client,
        client.get(f"{runtime.admin_url}/.well-known/jwks.json") as reply,
    ):
        assert reply.status == 200, await reply.text()
        document = await json_of(reply)
    (key,) = document["keys"]
    assert key["kty"] == "OKP" and key["crv"] == "Ed25519" and "d" not in key
    assert jwt.get_unverified_header(token)["kid"] == key["kid"]
    public = jwt.PyJWK.from_dict(key)
    claims = jwt.decode(token, public.key, algorithms=["EdDSA"], audience="sluice")
    assert claims["sub"] == "ci-bot"


@pytest.mark.asyncio
async def test_jwks_document_matches_the_signing_key_file(tmp_path: Path) -> None:
    """What the JWKS endpoint serves (LocalIssuer.jwks) verifies CLI tokens."""
    config = write_identity_config(tmp_path, LOCAL)
    result = sluice("token", "issue", "--sub", "ci-bot", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    key_file = tmp_path / "state" / LOCAL_KEY_FILE
    private = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    public = private.public_key()
    assert isinstance(public, Ed25519PublicKey)
    document = LocalIssuer(tmp_path / "state", issuer="sluice-local", audience="sluice").jwks()
    assert json.loads(json.dumps(document)) == document
    (jwk,) = document["keys"]
    assert set(jwk) == {"kty", "crv", "x", "kid", "alg", "use"}  # public members only
    for key in (public, jwt.PyJWK.from_dict(jwk).key):
        claims = jwt.decode(token, key, algorithms=["EdDSA"], audience="sluice")
        assert claims["sub"] == "ci-bot"
    assert jwt.get_unverified_header(token)["kid"] == jwk["kid"]


# --------------------------------------------------------------------------- the CLI


@pytest.mark.asyncio
async def test_cli_token_passes_the_proxy(tmp_path: Path) -> None:
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    rules = [{"name": "group-a", "groups": ["a"], "action": "allow"}]
    async with upstream_app(app) as upstream:
        config = write_identity_config(tmp_path, LOCAL, upstream=upstream, rules=rules)
        result = sluice(
            "token",
            "issue",
            "--sub",
            "x",
            "--groups",
            "a,b",
            "--ttl",
            "1h",
            "-c",
            str(config),
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        token = result.stdout.strip()
        assert token.count(".") == 2 and "\n" not in token
        claims = claims_of(token)
        assert claims["sub"] == "x"
        assert claims["groups"] == ["a", "b"]
        assert claims["exp"] - claims["iat"] == 3600
        assert claims["aud"] == "sluice" and claims["iss"] == "sluice-local"
        assert jwt.get_unverified_header(token)["alg"] == "EdDSA"
        other = sluice(
            "token", "issue", "--sub", "y", "--groups", "c", "-c", str(config), cwd=tmp_path
        )
        assert other.returncode == 0, other.stderr
        assert (
            claims_of(other.stdout.strip())["exp"] - claims_of(other.stdout.strip())["iat"] == 3600
        )  # token_ttl from the config

        async with running_proxy(config) as runtime, client_session() as client:
            async with client.get(
                f"{runtime.main_url}/api/ping", headers={"Authorization": f"Bearer {token}"}
            ) as reply:
                assert reply.status == 200, await reply.text()
            async with client.get(
                f"{runtime.main_url}/api/ping",
                headers={"Authorization": f"Bearer {other.stdout.strip()}"},
            ) as reply:
                assert reply.status == 403  # authenticated, but not in group a
        assert len(seen) == 1
        assert "Authorization" not in seen[0]


@pytest.mark.parametrize(
    "identity",
    [
        {"mode": "none"},
        {"mode": "oidc", "issuer": "https://idp.invalid/realms/dev"},
    ],
    ids=["none", "oidc"],
)
def test_cli_token_issue_needs_local_mode(tmp_path: Path, identity: dict[str, Any]) -> None:
    config = write_identity_config(tmp_path, identity)
    result = sluice("token", "issue", "--sub", "x", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert 'mode = "local"' in result.stderr
    assert not (tmp_path / "state" / LOCAL_KEY_FILE).exists()


@pytest.mark.parametrize(
    "args",
    [["--sub", " "], ["--sub", "x", "--ttl", "0s"], ["--sub", "x", "--ttl", "soon"], []],
    ids=["blank-sub", "zero-ttl", "bad-ttl", "no-sub"],
)
def test_cli_token_issue_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    config = write_identity_config(tmp_path, LOCAL)
    result = sluice("token", "issue", *args, "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""


def test_signing_key_file_is_private(tmp_path: Path) -> None:
    config = write_identity_config(tmp_path, LOCAL)
    result = sluice("token", "issue", "--sub", "x", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    state = tmp_path / "state"
    key_file = state / LOCAL_KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in key_file.read_bytes()
    # a second issue reuses the key: both tokens name the same kid
    again = sluice("token", "issue", "--sub", "x", "-c", str(config), cwd=tmp_path)
    kids = {jwt.get_unverified_header(t.strip())["kid"] for t in (result.stdout, again.stdout)}
    assert len(kids) == 1
    # a key others can read is refused rather than used
    key_file.chmod(0o644)
    refused = sluice("token", "issue", "--sub", "x", "-c", str(config), cwd=tmp_path)
    assert refused.returncode != 0
    assert refused.stdout == ""


def test_unsafe_signing_key_is_a_clean_error(tmp_path: Path) -> None:
    config = write_identity_config(tmp_path, LOCAL)
    assert sluice("token", "issue", "--sub", "x", "-c", str(config), cwd=tmp_path).returncode == 0
    (tmp_path / "state" / LOCAL_KEY_FILE).chmod(0o644)
    result = sluice("token", "issue", "--sub", "x", "-c", str(config), cwd=tmp_path)
    assert result.returncode in (1, 2)
    assert "readable by others" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.asyncio
async def test_proxy_creates_the_signing_key_0600(tmp_path: Path) -> None:
    async with running_proxy(write_identity_config(tmp_path, LOCAL)) as runtime:
        key_file = runtime.state_dir / LOCAL_KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


# --------------------------------------------------------------------------- check-config


@pytest.mark.parametrize("where", ["listen", "admin_listen", "target_listen"])
def test_mode_none_off_loopback_is_rejected(tmp_path: Path, where: str) -> None:
    """Validation only: nothing is bound, so the wildcard address is never listened on."""
    wildcard = f"0.0.0.0:{free_port()}"
    document = tomllib.loads(config_text(tmp_path, upstreams={"api": "http://127.0.0.1:9"}))
    if where == "target_listen":
        document["targets"][0]["listen"] = wildcard
    else:
        document["proxy"][where] = wildcard
    document["identity"] = {"mode": "none"}
    config = tmp_path / "sluice.toml"
    config.write_text(tomli_w.dumps(document), encoding="utf-8")
    result = sluice("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert 'identity mode "none" is only allowed on loopback listeners' in result.stderr
    assert "0.0.0.0" in result.stderr
    assert f"{config}:" in result.stderr  # file (and line) named
    # the same listeners with tokens required are fine
    document["identity"] = {"mode": "local"}
    config.write_text(tomli_w.dumps(document), encoding="utf-8")
    accepted = sluice("check-config", "-c", str(config), cwd=tmp_path)
    assert accepted.returncode == 0, accepted.stderr


def test_mode_none_on_loopback_is_accepted(tmp_path: Path) -> None:
    document = tomllib.loads(config_text(tmp_path, upstreams={"api": "http://127.0.0.1:9"}))
    document["proxy"]["listen"] = f"{LOOPBACK}:{free_port()}"
    document["identity"] = {"mode": "none"}
    config = tmp_path / "sluice.toml"
    config.write_text(tomli_w.dumps(document), encoding="utf-8")
    result = sluice("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.asyncio
async def test_every_event_of_a_request_names_its_session(tmp_path: Path) -> None:
    """Identity issue: the session id is in every event of an authenticated request."""
    from aiohttp import web

    from tests.helpers import client_session, running_proxy, upstream_app, write_config

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="fine")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    async with upstream_app(app) as url:
        path = write_config(
            tmp_path, upstreams={"repo": url}, proxy={"state_dir": str(tmp_path / "state")}
        )
        text = path.read_text().replace("[proxy]", '[identity]\nmode = "local"\n\n[proxy]', 1)
        path.write_text(text)
        async with running_proxy(path) as runtime, client_session() as client:
            assert runtime.gate is not None and runtime.gate.local_issuer is not None
            token = runtime.gate.local_issuer.issue("ada", ["agents"], 600)
            async with client.get(
                f"{runtime.main_url}/repo/x", headers={"Authorization": f"Bearer {token}"}
            ) as reply:
                assert reply.status == 200
                request_id = reply.headers["X-Sluice-Request-Id"]
            events = [e for e in runtime.bus.since(0)[0] if e.data.get("request_id") == request_id]
            kinds = [e.type for e in events]
            assert kinds[0] == "request.received" and kinds[-1] == "request.completed"
            assert len(events) >= 4
            assert {e.data.get("session") for e in events} == {events[0].data["session"]}
            assert events[0].data["session"].startswith("ada/")
