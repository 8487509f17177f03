"""Real clients through the forward proxy: curl, git (smart HTTP), httpx and requests.

The proxy runs in this event loop with names resolved from a fixed table (every name is
127.0.0.1); the clients run as child processes with only the proxy and CA settings in
their environment; upstreams are HTTPS servers with trustme certificates, trusted by the
proxy through ``[forward] ca_bundle``. Nothing listens or connects outside 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from forward_support import (
    Seen,
    forward_proxy,
    recording_app,
    serve,
    server_context,
    sluice_ca,
    token,
    write_forward_config,
)
from helpers import admin_token, client_session

from proxy.masking.fakes import fake
from proxy.server.runtime import ProxyRuntime

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]
GH = fake("github-pat", random.Random(101))[0]
UPSTREAM_CA = trustme.CA()
EGRESS = [{"name": "lab", "host": "*.test", "allow_private": True}]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def bundle(tmp_path: Path) -> Path:
    path = tmp_path / "upstream-ca.pem"
    UPSTREAM_CA.cert_pem.write_to_path(str(path))
    return path


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A child's environment: no proxy or CA settings but the ones a test gives."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }
    env.update(extra)
    return env


def proxy_env(runtime: ProxyRuntime, tmp_path: Path, agent_token: str) -> dict[str, str]:
    host_port = runtime.main_url.removeprefix("http://")
    proxy = f"http://agent:{agent_token}@{host_port}"
    ca = str(sluice_ca(runtime).cert_path)
    return clean_env(
        tmp_path,
        HTTPS_PROXY=proxy,
        https_proxy=proxy,
        HTTP_PROXY=proxy,
        http_proxy=proxy,
        SSL_CERT_FILE=ca,
        REQUESTS_CA_BUNDLE=ca,
        GIT_SSL_CAINFO=ca,
    )


async def run(
    *argv: str, env: dict[str, str], cwd: Path | None = None, seconds: float = 30
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def leaky(request: web.Request) -> web.Response:
    if request.method == "POST":
        return web.json_response({"received": len(await request.read())})
    return web.Response(text=f"deploy_token={GH}\n", content_type="text/plain")


# --------------------------------------------------------------------------- curl


@needs_curl
async def test_curl_through_connect_and_absolute_form(tmp_path: Path) -> None:
    seen: list[Seen] = []
    rules = [{"name": "lab-read", "host": "repo.test", "method": "GET", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=EGRESS, ca_bundle=bundle(tmp_path))
    async with (
        serve(recording_app(seen, leaky), server_context(UPSTREAM_CA)) as up,
        serve(recording_app(seen, leaky)) as plain,
        forward_proxy(path) as runtime,
    ):
        agent = token(runtime)
        env = clean_env(tmp_path)
        ca = str(sluice_ca(runtime).cert_path)
        base = ["curl", "-sS", "--max-time", "15", "-x", runtime.main_url, "--cacert", ca]
        url = f"https://repo.test:{up.port}/log"
        code, out, err = await run(*base, "--proxy-user", f"agent:{agent}", url, env=env)
        assert code == 0, err
        assert out.startswith("deploy_token=") and GH not in out
        code, out, err = await run(
            *base, "--proxy-header", f"Proxy-Authorization: Bearer {agent}", url, env=env
        )
        assert code == 0, err
        assert GH not in out
        # no token: the CONNECT is answered 407 and curl gives up
        code, out, err = await run(*base, url, env=env)
        assert code != 0 and "407" in err
        code, out, err = await run(*base, "--proxy-user", "agent:wrong", url, env=env)
        assert code != 0 and "407" in err
        # plain http:// goes out as an absolute-form request
        code, out, err = await run(
            *base,
            "--proxy-user",
            f"agent:{agent}",
            "-w",
            "\n%{http_code}",
            f"http://repo.test:{plain.port}/log",
            env=env,
        )
        assert code == 0, err
        assert out.rstrip().endswith("200") and GH not in out
        # denied by default (no rule allows POST): Sluice's JSON inside the tunnel
        code, out, err = await run(
            *base, "--proxy-user", f"agent:{agent}", "-d", "x=1", url, env=env
        )
        assert code == 0, err
        assert json.loads(out)["error"] == "denied"
    assert [s.method for s in seen] == ["GET", "GET", "GET"]


# --------------------------------------------------------------------------- python clients


CLIENT_SCRIPT = """
import json, sys
url = sys.argv[2]
if sys.argv[1] == "httpx":
    import httpx
    reply = httpx.get(url, timeout=15)
    print(json.dumps({"status": reply.status_code, "text": reply.text}))
else:
    import requests
    reply = requests.get(url, timeout=15)
    print(json.dumps({"status": reply.status_code, "text": reply.text}))
"""


@pytest.mark.parametrize("library", ["httpx", "requests"])
async def test_python_clients_honour_the_environment(tmp_path: Path, library: str) -> None:
    seen: list[Seen] = []
    rules = [{"name": "lab-read", "host": "repo.test", "method": "GET", "action": "allow"}]
    path = write_forward_config(tmp_path, rules=rules, egress=EGRESS, ca_bundle=bundle(tmp_path))
    async with (
        serve(recording_app(seen, leaky), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        env = proxy_env(runtime, tmp_path, token(runtime))
        url = f"https://repo.test:{up.port}/log"
        code, out, err = await run(sys.executable, "-c", CLIENT_SCRIPT, library, url, env=env)
        assert code == 0, err
        answer = json.loads(out)
        assert answer["status"] == 200
        assert answer["text"].startswith("deploy_token=") and GH not in answer["text"]
        # the same client with a bad token in its proxy URL: refused at the CONNECT
        bad = proxy_env(runtime, tmp_path, "not-a-token")
        code, out, err = await run(sys.executable, "-c", CLIENT_SCRIPT, library, url, env=bad)
        assert code != 0 and "407" in err
    assert len(seen) == 1


# --------------------------------------------------------------------------- git


def git_backend_app(root: Path, seen: list[Seen]) -> web.Application:
    """``git http-backend`` as CGI behind aiohttp: a real smart-HTTP server."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(Seen(request.method, request.path_qs, dict(request.headers), body))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(root),
            "REQUEST_METHOD": request.method,
            "PATH_INFO": request.path,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "agent",
            "REMOTE_ADDR": "127.0.0.1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
        }
        if "Content-Encoding" in request.headers:
            env["HTTP_CONTENT_ENCODING"] = request.headers["Content-Encoding"]
        if "Git-Protocol" in request.headers:
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        process = await asyncio.create_subprocess_exec(
            "git",
            "http-backend",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, _err = await asyncio.wait_for(process.communicate(body), 30)
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status = 200
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers[name.strip()] = value.strip()
        return web.Response(status=status, body=payload, headers=headers)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def make_bare_repos(tmp_path: Path, env: dict[str, str]) -> Path:
    root = tmp_path / "srv"
    seed = tmp_path / "seed"
    root.mkdir()
    for name in ("repo.git", "locked.git"):
        assert (await run("git", "init", "-q", "--bare", "-b", "main", str(root / name), env=env))[
            0
        ] == 0
        await run("git", "-C", str(root / name), "config", "http.receivepack", "true", env=env)
    assert (await run("git", "init", "-q", "-b", "main", str(seed), env=env))[0] == 0
    (seed / "README").write_text("hello\n")
    for argv in (
        ("git", "-C", str(seed), "add", "README"),
        (
            "git",
            "-C",
            str(seed),
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "one",
        ),
        ("git", "-C", str(seed), "push", "-q", str(root / "repo.git"), "main"),
        ("git", "-C", str(seed), "push", "-q", str(root / "locked.git"), "main"),
    ):
        code, _, err = await run(*argv, env=env)
        assert code == 0, err
    return root


GIT_RULES = [
    {
        "name": "push-repo",
        "host": "git.test",
        "method": "POST",
        "path": "/repo.git/git-receive-pack",
        "action": "approve",
        "reason": "pushes need a person",
    },
    {
        "name": "push-locked",
        "host": "git.test",
        "method": "POST",
        "path": "/locked.git/git-receive-pack",
        "action": "deny",
        "reason": "locked.git is read-only for agents",
    },
    {"name": "git-read", "host": "git.test", "action": "allow"},
]


async def pending_approvals(runtime: ProxyRuntime) -> list[dict[str, Any]]:
    admin = {"Authorization": f"Bearer {admin_token(runtime)}"}
    async with (
        client_session() as client,
        client.get(f"{runtime.admin_url}/api/approvals", headers=admin) as reply,
    ):
        return list((await reply.json())["approvals"])


async def decide(runtime: ProxyRuntime, approval: str, decision: str) -> None:
    admin = {"Authorization": f"Bearer {admin_token(runtime)}"}
    async with (
        client_session() as client,
        client.post(
            f"{runtime.admin_url}/api/approvals/{approval}",
            headers=admin,
            json={"decision": decision, "scope": "once", "reason": "test"},
        ) as reply,
    ):
        assert reply.status == 200, await reply.text()


@needs_git
async def test_git_clone_held_push_approved_and_denied_push(tmp_path: Path) -> None:
    seen: list[Seen] = []
    plain_env = clean_env(tmp_path)
    root = await make_bare_repos(tmp_path, plain_env)
    path = write_forward_config(
        tmp_path,
        rules=GIT_RULES,
        egress=EGRESS,
        ca_bundle=bundle(tmp_path),
        extra={"approvals": {"timeout": "30s"}},
    )
    async with (
        serve(git_backend_app(root, seen), server_context(UPSTREAM_CA)) as up,
        forward_proxy(path) as runtime,
    ):
        env = proxy_env(runtime, tmp_path, token(runtime))
        work = tmp_path / "work"
        url = f"https://git.test:{up.port}/repo.git"
        code, _, err = await run("git", "clone", "-q", url, str(work), env=env)
        assert code == 0, err
        assert (work / "README").read_text() == "hello\n"
        (work / "CHANGE").write_text("agent change\n")
        ident = ("-c", "user.name=agent", "-c", "user.email=agent@test")
        for argv in (("add", "CHANGE"), (*ident, "commit", "-qm", "two")):
            assert (await run("git", "-C", str(work), *argv, env=env))[0] == 0
        # the push is held until a person approves it through the admin API
        push = asyncio.create_task(
            run("git", "-C", str(work), "push", "-q", "origin", "main", env=env)
        )
        pending: list[dict[str, Any]] = []
        for _ in range(300):
            pending = await pending_approvals(runtime)
            if pending or push.done():
                break
            await asyncio.sleep(0.05)
        assert pending, push.result() if push.done() else "no approval appeared"
        assert (
            pending[0]["rule"] == "push-repo" and pending[0]["path"] == "/repo.git/git-receive-pack"
        )
        assert not any("git-receive-pack" in s.path_qs and s.method == "POST" for s in seen)
        await decide(runtime, pending[0]["id"], "approve")
        code, _, err = await asyncio.wait_for(push, 30)
        assert code == 0, err
        code, out, _ = await run(
            "git", "--git-dir", str(root / "repo.git"), "log", "--format=%s", "main", env=plain_env
        )
        assert out.split() == ["two", "one"]
        # a push to the locked repository is refused by policy, before the upstream sees it
        code, _, err = await run(
            "git",
            "-C",
            str(work),
            "push",
            "-q",
            f"https://git.test:{up.port}/locked.git",
            "main",
            env=env,
        )
        assert code != 0 and "403" in err
    assert not any(s.path_qs.startswith("/locked.git/git-receive-pack") for s in seen)
    code, out, _ = await run(
        "git", "--git-dir", str(root / "locked.git"), "log", "--format=%s", "main", env=plain_env
    )
    assert out.split() == ["one"]


# --------------------------------------------------------------------------- a real process


@needs_curl
async def test_sluice_proxy_process_trusts_ssl_cert_file_and_intercepts_an_ip(
    tmp_path: Path,
) -> None:
    """`sluice proxy` as its own process, with the system resolver and connector, and no
    ca_bundle: the upstream's CA comes from SSL_CERT_FILE in the proxy's environment."""
    from proxy.tls.ca import LocalCA

    source_root = Path(__file__).resolve().parent.parent
    seen: list[Seen] = []
    rules = [{"name": "lab", "host": "127.0.0.1", "method": "GET", "action": "allow"}]
    egress = [{"name": "lab", "host": "127.0.0.1", "allow_private": True}]
    path = write_forward_config(tmp_path, rules=rules, egress=egress, identity={"mode": "none"})
    upstream_ca = bundle(tmp_path)
    state = tmp_path / "cli-state"
    env = clean_env(
        tmp_path,
        PYTHONPATH=str(source_root),
        PYTHONUNBUFFERED="1",
        SSL_CERT_FILE=str(upstream_ca),
    )
    async with serve(recording_app(seen, leaky), server_context(UPSTREAM_CA)) as up:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "proxy",
            "-c",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--state-dir",
            str(state),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            main_url = ""
            async with asyncio.timeout(20):
                while not main_url:
                    line = (await process.stdout.readline()).decode()
                    assert line, "the proxy exited before listening"
                    if "listening on " in line:
                        main_url = line.split("listening on ", 1)[1].split()[0]
            ca = LocalCA.load_or_create(state).cert_path
            base = ["curl", "-sS", "--max-time", "15", "-x", main_url, "--cacert", str(ca)]
            code, out, err = await run(
                *base, f"https://127.0.0.1:{up.port}/log", env=clean_env(tmp_path)
            )
            assert code == 0, err
            assert out.startswith("deploy_token=") and GH not in out
            # the same upstream by a name that resolves to loopback, no rule naming it
            code, out, err = await run(
                *base, f"http://localhost:{up.port}/log", env=clean_env(tmp_path)
            )
            assert code == 0 and json.loads(out)["error"] in ("denied", "destination_refused")
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), 15)
    assert len(seen) == 1
