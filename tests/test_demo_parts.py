"""Demo building blocks over real 127.0.0.1 sockets: workspace, stand-in upstreams, agent."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import socket
import stat
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from yarl import URL

from proxy.demo import workspace as workspace_module
from proxy.demo.agent import AgentStep, classify, run_agent
from proxy.demo.upstreams import start_upstreams
from proxy.demo.workspace import build_workspace

ENV_PATTERNS = {
    "DATABASE_URL": r"postgres://app:[A-Za-z0-9]{20}@db\.internal:5432/app",
    "STRIPE_SECRET_KEY": r"sk_live_[A-Za-z0-9]{24}",
    "GITHUB_TOKEN": r"ghp_[A-Za-z0-9]{36}",
    "AWS_SECRET_ACCESS_KEY": r"[A-Za-z0-9+/]{40}",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env_values(root: pathlib.Path) -> dict[str, str]:
    lines = (root / ".env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


@pytest.fixture
def repo_root(tmp_path: pathlib.Path) -> pathlib.Path:
    return build_workspace(tmp_path / "repo")


@pytest_asyncio.fixture
async def upstreams(repo_root: pathlib.Path) -> AsyncIterator[tuple[str, str]]:
    repo_port, build_port = free_port(), free_port()
    cleanup = await start_upstreams(repo_root, repo_port, build_port)
    try:
        yield f"http://127.0.0.1:{repo_port}", f"http://127.0.0.1:{build_port}"
    finally:
        await cleanup()


def test_workspace_files_modes_and_fake_secrets(repo_root: pathlib.Path) -> None:
    for rel in ["README.md", "src/app.py", "src/util.py", "tests/test_app.py", "pyproject.toml"]:
        assert (repo_root / rel).is_file(), rel
    assert len((repo_root / "src/app.py").read_text().splitlines()) >= 25
    compile((repo_root / "src/app.py").read_text(), "app.py", "exec")
    for rel in [".env", "keys/deploy_key.pem"]:
        assert stat.S_IMODE((repo_root / rel).stat().st_mode) == 0o600, rel

    env_text = (repo_root / ".env").read_text()
    assert env_text.startswith("#") and "fake" in env_text.splitlines()[0].lower()
    values = env_values(repo_root)
    for name, pattern in ENV_PATTERNS.items():
        assert re.fullmatch(pattern, values[name]), name

    pem = (repo_root / "keys/deploy_key.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
    assert isinstance(load_pem_private_key(pem, password=None), Ed25519PrivateKey)


def test_workspace_rebuild_rewrites_secrets(repo_root: pathlib.Path) -> None:
    before = env_values(repo_root)
    (repo_root / ".env").chmod(0o644)
    (repo_root / "src/app.py").write_text("broken")
    assert build_workspace(repo_root) == repo_root
    assert env_values(repo_root)["GITHUB_TOKEN"] != before["GITHUB_TOKEN"]
    assert stat.S_IMODE((repo_root / ".env").stat().st_mode) == 0o600
    assert "Router" in (repo_root / "src/app.py").read_text()


def test_workspace_source_holds_no_secret_literals() -> None:
    source = pathlib.Path(workspace_module.__file__).read_text()
    for pattern in ENV_PATTERNS.values():
        assert not re.search(pattern, source)
    assert "BEGIN PRIVATE KEY" not in source


@pytest.mark.asyncio
async def test_repo_upstream_endpoints(upstreams: tuple[str, str], repo_root: pathlib.Path) -> None:
    repo, _build = upstreams
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{repo}/health") as resp:
            assert resp.status == 200 and await resp.json() == {"ok": True}

        async with http.get(f"{repo}/api/tree") as resp:
            files = (await resp.json())["files"]
        paths = [item["path"] for item in files]
        assert paths == sorted(paths)
        assert {".env", "keys/deploy_key.pem", "src/app.py", "README.md"} <= set(paths)
        app_entry = next(item for item in files if item["path"] == "src/app.py")
        assert app_entry["size"] == (repo_root / "src/app.py").stat().st_size

        async with http.get(f"{repo}/api/files/src/app.py") as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            assert await resp.read() == (repo_root / "src/app.py").read_bytes()
        async with http.get(f"{repo}/api/files/keys/deploy_key.pem") as resp:
            assert resp.content_type == "application/x-pem-file"
        async with http.get(f"{repo}/api/files/nope.txt") as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found"
        for raw in [
            "/api/files/%2E%2E/outside.txt",
            "/api/files/src/%2e%2e/%2e%2e/x",
            "/api/files/%2Fetc%2Fpasswd",
        ]:
            async with http.get(URL(repo + raw, encoded=True)) as resp:
                assert resp.status == 400, raw
                assert (await resp.json())["error"] == "bad_path"

        async with http.get(f"{repo}/api/commits") as resp:
            assert len(await resp.json()) == 2
        body = json.dumps({"branch": "feat/x", "message": "m", "files": {"a.py": "x=1\n"}})
        async with http.post(f"{repo}/api/push", data=body) as resp:
            assert resp.status == 201
            assert await resp.json() == {
                "status": "accepted",
                "branch": "feat/x",
                "commit": hashlib.sha1(body.encode()).hexdigest(),
            }
        async with http.get(f"{repo}/api/commits") as resp:
            commits = await resp.json()
        assert len(commits) == 3 and commits[0]["branch"] == "feat/x"
        async with http.post(f"{repo}/api/push", data="{not json") as resp:
            assert resp.status == 400 and (await resp.json())["error"] == "bad_json"
        async with http.post(f"{repo}/api/push", json={"branch": 3}) as resp:
            assert resp.status == 400

        async with http.delete(f"{repo}/api/branches/agent/fix-typo") as resp:
            assert await resp.json() == {"deleted": "agent/fix-typo"}


@pytest.mark.asyncio
async def test_build_upstream_endpoints(upstreams: tuple[str, str]) -> None:
    _repo, build = upstreams
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{build}/health") as resp:
            assert await resp.json() == {"ok": True}
        async with http.get(f"{build}/api/builds/latest") as resp:
            latest = await resp.json()
        assert (latest["id"], latest["status"], latest["branch"]) == (41, "passed", "main")
        async with http.get(f"{build}/api/builds/42/log") as resp:
            assert resp.status == 404
        for expected in (42, 43):
            async with http.post(f"{build}/api/builds", json={"branch": "b"}) as resp:
                assert resp.status == 202
                assert await resp.json() == {"id": expected, "status": "queued"}
        async with http.post(f"{build}/api/builds", data="nope") as resp:
            assert resp.status == 400
        async with http.get(f"{build}/api/builds/42/log") as resp:
            assert resp.content_type == "text/plain"
            log = await resp.text()
        assert 15 <= len(log.splitlines()) <= 30 and "passed" in log and "pip install" in log


async def start_fake_proxy(
    repo: str, build: str, seen_auth: list[str | None]
) -> tuple[web.AppRunner, str]:
    """Forward /repo and /build to the stand-ins; refuse anything ending in .env."""
    targets = {"repo": repo, "build": build}

    async def forward(request: web.Request) -> web.Response:
        seen_auth.append(request.headers.get("Authorization"))
        if request.path.endswith(".env"):
            return web.json_response(
                {
                    "error": "denied",
                    "rule": "secret-files",
                    "reason": "credential file",
                    "request_id": "req-1",
                },
                status=403,
            )
        url = targets[request.match_info["target"]] + "/" + request.match_info["tail"]
        body = await request.read()
        headers = {"Content-Type": request.content_type}
        async with (
            aiohttp.ClientSession() as http,
            http.request(request.method, url, data=body, headers=headers) as up,
        ):
            return web.Response(
                body=await up.read(), status=up.status, content_type=up.content_type
            )

    app = web.Application()
    app.router.add_route("*", "/{target:repo|build}/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/"


@pytest.mark.asyncio
async def test_agent_through_fake_proxy(
    upstreams: tuple[str, str], repo_root: pathlib.Path
) -> None:
    seen_auth: list[str | None] = []
    runner, base_url = await start_fake_proxy(*upstreams, seen_auth)
    reported: list[AgentStep] = []
    try:
        steps = await run_agent(base_url, token="tok-123", pause=0, on_step=reported.append)
    finally:
        await runner.cleanup()

    assert reported == steps and len(steps) == 11
    assert [s.verdict for s in steps] == ["allowed"] * 2 + ["denied"] + ["allowed"] * 8
    assert [s.status for s in steps] == [200, 200, 403, 200, 201, 201, 200, 202, 200, 202, 200]
    assert steps[2].path == "/repo/api/files/.env"
    assert steps[2].detail == "secret-files: credential file"
    assert steps[4].method == "POST" and steps[10].method == "DELETE"
    assert steps[9].intent == "send a token it found to the build server"
    assert seen_auth == ["Bearer tok-123"] * 11

    secrets_seen = list(env_values(repo_root).values())
    secrets_seen.append((repo_root / "keys/deploy_key.pem").read_text().splitlines()[1])
    for step in steps:
        for value in secrets_seen:
            assert value not in repr(step)


@pytest.mark.asyncio
async def test_agent_unreachable_proxy_never_raises() -> None:
    steps = await run_agent(f"http://127.0.0.1:{free_port()}", pause=0)
    assert len(steps) == 11
    assert all(s.status is None and s.verdict == "error" and s.detail for s in steps)


def test_classify_contract() -> None:
    denied = json.dumps({"error": "denied", "rule": None, "reason": "no", "request_id": "r"})
    assert classify(403, denied.encode(), "application/json") == ("denied", "no")
    failed = json.dumps({"error": "bad_gateway", "reason": "upstream down"}).encode()
    assert classify(502, failed, "application/json") == ("error", "upstream down")
    assert classify(500, b"boom", "text/plain") == ("error", "HTTP 500: 4 bytes text/plain")
    assert classify(200, b"[1, 2]", "application/json") == ("allowed", "json list of 2 items")
    assert classify(200, b'{"b": 1, "a": 2}', "application/json") == (
        "allowed",
        "json keys: a, b",
    )
