"""Stand-ins for a code-hosting service and a build server, so the demo needs no real ones.

They are deliberately naive (no auth, no policy): every guard in the demo must come from the
proxy in front of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.masking.fakes import fake

_WORKSPACE = web.AppKey("workspace", pathlib.Path)
_COMMITS = web.AppKey("commits", list)
_BUILDS = web.AppKey("builds", dict)

_FIRST_BUILD_ID = 41


def _error(status: int, error: str, reason: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status)


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _initial_commits() -> list[dict[str, Any]]:
    """Newest first, like `git log`."""
    return [
        {
            "sha": _sha1("Clamp stock adjustments at zero"),
            "branch": "main",
            "author": "maria.k",
            "message": "Clamp stock adjustments at zero",
            "date": "2024-05-14T16:02:11Z",
        },
        {
            "sha": _sha1("Add /items listing endpoint"),
            "branch": "main",
            "author": "dev.tomas",
            "message": "Add /items listing endpoint",
            "date": "2024-05-13T09:41:57Z",
        },
    ]


def _list_files(root: pathlib.Path) -> list[dict[str, Any]]:
    files = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = pathlib.Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            files.append({"path": rel, "size": full.stat().st_size})
    return sorted(files, key=lambda item: item["path"])


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def _tree(request: web.Request) -> web.Response:
    return web.json_response({"files": _list_files(request.app[_WORKSPACE])})


async def _read_file(request: web.Request) -> web.Response:
    rel = request.match_info["path"]
    # Checked on the decoded path, so %2e%2e and %2f cannot sneak past the router.
    parts = rel.replace("\\", "/").split("/")
    absolute = rel.startswith(("/", "\\")) or bool(pathlib.PureWindowsPath(rel).drive)
    if not rel or absolute or ".." in parts:
        return _error(400, "bad_path", "path must be relative and must not contain '..'")
    root = request.app[_WORKSPACE].resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        return _error(400, "bad_path", "path escapes the repository")
    if not target.is_file():
        return _error(404, "not_found", f"no such file: {rel}")
    if target.suffix == ".pem":
        return web.Response(body=target.read_bytes(), content_type="application/x-pem-file")
    return web.Response(body=target.read_bytes(), content_type="text/plain", charset="utf-8")


async def _commits(request: web.Request) -> web.Response:
    return web.json_response(request.app[_COMMITS])


def _valid_push(payload: Any) -> str | None:
    """Return why the push body is unusable, or None if it is fine."""
    if not isinstance(payload, dict):
        return "body must be a JSON object"
    if not isinstance(payload.get("branch"), str) or not payload["branch"]:
        return "'branch' must be a non-empty string"
    if not isinstance(payload.get("message"), str):
        return "'message' must be a string"
    files = payload.get("files", {})
    if not isinstance(files, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in files.items()
    ):
        return "'files' must map paths to string contents"
    return None


async def _push(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "bad_json", "body is not valid JSON")
    problem = _valid_push(payload)
    if problem:
        return _error(400, "bad_request", problem)
    sha = hashlib.sha1(raw).hexdigest()
    request.app[_COMMITS].insert(
        0,
        {
            "sha": sha,
            "branch": payload["branch"],
            "author": "agent",
            "message": payload["message"],
            "files": sorted(payload.get("files", {})),
        },
    )
    return web.json_response(
        {"status": "accepted", "branch": payload["branch"], "commit": sha}, status=201
    )


async def _delete_branch(request: web.Request) -> web.Response:
    return web.json_response({"deleted": request.match_info["name"]})


def make_repo_app(workspace: pathlib.Path) -> web.Application:
    """Serve `workspace` as a read/push code-hosting API."""
    app = web.Application()
    app[_WORKSPACE] = pathlib.Path(workspace)
    app[_COMMITS] = _initial_commits()
    app.router.add_get("/health", _health)
    app.router.add_get("/api/tree", _tree)
    app.router.add_get("/api/files/{path:.*}", _read_file)
    app.router.add_get("/api/commits", _commits)
    app.router.add_post("/api/push", _push)
    # Branch names usually contain slashes (agent/fix-typo), so match them whole.
    app.router.add_delete("/api/branches/{name:.+}", _delete_branch)
    return app


_LEAK = web.AppKey("leaked_token", str)
_LOG_TEMPLATE = """\
[ci] build #{id} for branch {branch} on runner ci-linux-04
[ci] checking out {branch} at {sha}
[ci] env: GITHUB_TOKEN={leak}   (a misconfigured step echoes its token)
$ python -m venv .venv
$ .venv/bin/pip install -e '.[test]'
Obtaining file:///builds/inventory-service
  Installing build dependencies ... done
  Getting requirements to build editable ... done
Collecting pytest>=8
  Using cached pytest-8.2.0-py3-none-any.whl (339 kB)
Installing collected packages: iniconfig, pluggy, packaging, pytest, inventory-service
Successfully installed inventory-service-0.4.2 pytest-8.2.0
$ .venv/bin/pytest -q
============================= test session starts ==============================
platform linux -- Python 3.11.9, pytest-8.2.0, pluggy-1.5.0
rootdir: /builds/inventory-service
collected 3 items

tests/test_app.py ...                                                    [100%]

============================== 3 passed in 0.04s ===============================
[ci] build #{id} finished: {status}
"""


async def _latest_build(request: web.Request) -> web.Response:
    builds = request.app[_BUILDS]
    return web.json_response(builds[max(builds)])


async def _start_build(request: web.Request) -> web.Response:
    try:
        payload = await request.json()
    except (ValueError, UnicodeDecodeError):
        return _error(400, "bad_json", "body is not valid JSON")
    if not isinstance(payload, dict) or not isinstance(payload.get("branch"), str):
        return _error(400, "bad_request", "'branch' must be a string")
    builds = request.app[_BUILDS]
    build_id = max(builds) + 1
    builds[build_id] = {"id": build_id, "status": "queued", "branch": payload["branch"]}
    return web.json_response({"id": build_id, "status": "queued"}, status=202)


async def _build_log(request: web.Request) -> web.Response:
    raw_id = request.match_info["id"]
    build = request.app[_BUILDS].get(int(raw_id)) if raw_id.isdigit() else None
    if build is None:
        return _error(404, "not_found", f"no build {raw_id}")
    # Queued builds "finish" the moment someone looks: the demo has no real runner.
    log = _LOG_TEMPLATE.format(
        id=build["id"],
        branch=build["branch"],
        sha=_sha1(build["branch"])[:12],
        status="passed",
        leak=request.app[_LEAK],
    )
    return web.Response(text=log, content_type="text/plain")


def make_build_app() -> web.Application:
    """A build server whose history starts at a green build #41; new builds count up from 42."""
    app = web.Application()
    # A fake token in the issuer's real format (checksum included), so masking can catch it.
    app[_LEAK] = fake("github-pat", random.Random())[1]
    app[_BUILDS] = {
        _FIRST_BUILD_ID: {
            "id": _FIRST_BUILD_ID,
            "status": "passed",
            "branch": "main",
            "commit": _sha1("Clamp stock adjustments at zero"),
            "duration_s": 48,
            "finished_at": "2024-05-14T16:05:40Z",
        }
    }
    app.router.add_get("/health", _health)
    app.router.add_get("/api/builds/latest", _latest_build)
    app.router.add_post("/api/builds", _start_build)
    app.router.add_get("/api/builds/{id}/log", _build_log)
    return app


async def start_upstreams(
    workspace: pathlib.Path, repo_port: int, build_port: int, host: str = "127.0.0.1"
) -> Callable[[], Awaitable[None]]:
    """Start both stand-ins; the returned coroutine function stops them."""
    runners: list[web.AppRunner] = []

    async def cleanup() -> None:
        for runner in reversed(runners):
            await runner.cleanup()
        runners.clear()

    try:
        for app, port in ((make_repo_app(workspace), repo_port), (make_build_app(), build_port)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port).start()
    except BaseException:
        await cleanup()
        raise
    return cleanup
