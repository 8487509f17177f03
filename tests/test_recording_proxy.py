"""Session recording end to end: a real Sluice in-process, a real aiohttp upstream, and
the recordings it leaves in ``<state_dir>/recordings`` checked with the ``sluice`` CLI.

Identity is ``mode = "local"`` (the agent carries a JWT from the proxy's own issuer, so
sessions are real), one target gets a ``static`` credential from an environment variable,
and the upstream serves a canary secret (a valid fake from ``proxy.masking.fakes``). The
canary, the agent's token and the injected credential must appear nowhere in the
recordings, the sidecar blobs, the HAR export or the logs (captured at DEBUG).

Recorder faults are injected at ``proxy.recording.writer._write`` (the one place records
reach the disk): the proxy must then refuse with 503 ``recording_unavailable`` and the
upstream must receive nothing. Everything listens on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import tomli_w
from aiohttp import web
from helpers import admin_token, client_session, config_text, running_proxy, upstream_app

import proxy
from proxy.masking.fakes import fake
from proxy.recording import Recording, verify
from proxy.recording import writer as writer_module
from proxy.recording.files import list_recordings
from proxy.recording.format import decision_of
from proxy.server.runtime import ProxyRuntime

SOURCE_ROOT = Path(proxy.__file__).resolve().parent.parent
CRED_ENV = "SLUICE_TEST_RECORDING_CREDENTIAL"

# --------------------------------------------------------------------------- canaries

CANARY = fake("github-pat", random.Random(4242))[0]  # served in a small response body
CANARY_BIG = fake("github-pat", random.Random(4243))[0]  # served inside a big body
COOKIE_SECRET = "ck-" + "7f3a9c1e5b2d4f60" * 2  # sent by the upstream as Set-Cookie
CANARY_FILE = f"# deploy settings\nuser = bot\ntoken = {CANARY}\nretries = 3\n".encode()
BIG_LINE = b"func handler(w http.ResponseWriter, r *http.Request) { serve(w, r) }\n"
BIG_BODY = BIG_LINE * 1500 + f"\nclone with {CANARY_BIG}\n".encode() + BIG_LINE * 1500
assert len(BIG_BODY) > 200 * 1024
DEPLOY_BODY = json.dumps({"service": "web", "env": "prod", "replicas": 3}).encode()

RULES = [
    {"name": "no-secrets", "action": "deny", "target": "api", "path": "/secret/**"},
    {
        "name": "deploys",
        "action": "approve",
        "target": "api",
        "path": "/deploy/**",
        "reason": "deploys need a person",
    },
    {"name": "the-rest", "action": "allow"},
]


# --------------------------------------------------------------------------- upstream


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class Upstream:
    """Serves the canaries and a few fixed answers; keeps every request it received."""

    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, list(request.headers.items()), body))
        if request.path == "/files/canary":
            return web.Response(
                body=CANARY_FILE,
                content_type="text/plain",
                headers={"Set-Cookie": f"sid={COOKIE_SECRET}; HttpOnly"},
            )
        if request.path == "/files/big":
            return web.Response(body=BIG_BODY, content_type="text/plain")
        if request.path == "/echo":  # reflects what it received: the injected credential
            return web.json_response({"headers": list(request.headers.items())})
        if request.path.startswith("/pad/"):
            size = int(request.path.rsplit("/", 1)[1])
            return web.Response(body=b"p" * size, content_type="text/plain")
        return web.json_response({"ok": True, "path": request.path, "received": len(body)})


# --------------------------------------------------------------------------- plumbing


def recording_config(
    tmp_path: Path,
    upstream: str,
    *,
    recording: dict[str, Any] | None = None,
    name: str = "sluice.toml",
) -> Path:
    targets = [
        {"name": "api", "upstream": upstream},
        {"name": "vault", "upstream": upstream, "credential": "vault-key"},
    ]
    document = tomllib.loads(config_text(tmp_path, targets=targets, rules=RULES))
    document["identity"] = {"mode": "local", "approver_groups": ["approvers"], "token_ttl": "1h"}
    document["approvals"] = {"timeout": "10s"}
    document["credentials"] = {"vault-key": {"kind": "static", "env": CRED_ENV}}
    if recording is not None:
        document["recording"] = recording
    path = tmp_path / name
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


def recordings_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "recordings"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env.pop(CRED_ENV, None)  # the CLI never needs the credential
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


def capture_debug(caplog: pytest.LogCaptureFixture) -> None:
    for name in ("sluice", "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return caplog.text + "\n".join(
        f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records
    )


def records(directory: Path) -> list[dict[str, Any]]:
    """Every record of every recording file, in file order (raw JSONL, no index)."""
    out = []
    for path in list_recordings(directory):
        for line in path.read_bytes().splitlines():
            out.append(json.loads(line))
    return out


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Stack:
    """One proxy, its upstream, a client, and ways to act as agent or operator."""

    def __init__(
        self, runtime: ProxyRuntime, client: aiohttp.ClientSession, upstream: Upstream
    ) -> None:
        self.runtime = runtime
        self.client = client
        self.upstream = upstream
        self.admin = f"Bearer {admin_token(runtime)}"
        self.events: list[Any] = []
        runtime.bus.add_listener(self.events.append)
        issuer = runtime.gate.local_issuer if runtime.gate else None
        assert issuer is not None
        self.token = issuer.issue("alice", ["agents"], 600)

    async def send(self, path: str, *, method: str = "GET", body: bytes | None = None) -> Reply:
        async with self.client.request(
            method,
            f"{self.runtime.main_url}{path}",
            data=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as reply:
            return Reply(reply.status, dict(reply.headers), await reply.read())

    async def admin_get(self, path: str) -> dict[str, Any]:
        async with self.client.get(
            f"{self.runtime.admin_url}{path}", headers={"Authorization": self.admin}
        ) as reply:
            assert reply.status == 200, await reply.text()
            return json.loads(await reply.read())

    async def wait_pending(self, seconds: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + seconds
        while True:
            pending = (await self.admin_get("/api/approvals"))["approvals"]
            if pending:
                return pending[0]
            assert time.monotonic() < deadline, "nothing was held"
            await asyncio.sleep(0.01)

    async def decide(self, approval_id: str, decision: str) -> dict[str, Any]:
        async with self.client.post(
            f"{self.runtime.admin_url}/api/approvals/{approval_id}",
            json={"decision": decision, "scope": "once", "reason": "checked by a person"},
            headers={"Authorization": self.admin},
        ) as reply:
            assert reply.status == 200, await reply.text()
            return json.loads(await reply.read())

    async def held(self, path: str, decision: str) -> Reply:
        agent = asyncio.create_task(self.send(path, method="POST", body=DEPLOY_BODY))
        try:
            pending = await self.wait_pending()
            await self.decide(pending["id"], decision)
            return await asyncio.wait_for(agent, 5)
        finally:
            if not agent.done():
                agent.cancel()
                with contextlib.suppress(BaseException):
                    await agent

    async def settle(self) -> None:
        """Responses are recorded in the background: wait until they are on disk."""
        assert self.runtime.tap is not None
        await asyncio.wait_for(self.runtime.tap.flush(), 5)


@contextlib.asynccontextmanager
async def recording_stack(
    tmp_path: Path,
    upstream: Upstream | None = None,
    *,
    recording: dict[str, Any] | None = None,
    name: str = "sluice.toml",
) -> AsyncIterator[Stack]:
    upstream = upstream or Upstream()
    async with upstream_app(upstream.app()) as url:
        path = recording_config(tmp_path, url, recording=recording, name=name)
        async with running_proxy(path) as runtime, client_session() as client:
            yield Stack(runtime, client, upstream)


@dataclass
class Scenario:
    """What one recorded session did, for the checks after the proxy stopped."""

    config: Path
    token: str
    credential: str
    session: str
    replies: dict[str, Reply]
    request_ids: dict[str, str]
    upstream: Upstream


async def run_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recording: dict[str, Any] | None = None
) -> Scenario:
    """Allowed (canary, big body, injected credential), denied, held-then-approved and
    held-then-denied requests in one session; returns after the proxy has stopped."""
    credential = "vault-" + os.urandom(16).hex()
    monkeypatch.setenv(CRED_ENV, credential)
    upstream = Upstream()
    replies: dict[str, Reply] = {}
    async with recording_stack(
        tmp_path, upstream, recording=recording or {"max_inline_body": "64KiB"}
    ) as stack:
        replies["canary"] = await stack.send("/api/files/canary")
        replies["denied"] = await stack.send("/api/secret/keys")
        replies["approved"] = await stack.held("/api/deploy/web", "approve")
        replies["held-denied"] = await stack.held("/api/deploy/db", "deny")
        replies["vault"] = await stack.send("/vault/echo")
        replies["big"] = await stack.send("/api/files/big")
        await stack.settle()
        token = stack.token
        sessions = {e.data.get("session") for e in stack.events if e.type == "request.received"}
        config = stack.runtime.config.path
    assert [r.status for r in replies.values()] == [200, 403, 200, 403, 200, 200], {
        k: (r.status, r.body[:200]) for k, r in replies.items()
    }
    assert len(sessions) == 1, sessions
    # the credential really was injected: otherwise "not recorded" proves nothing
    (vault,) = [s for s in upstream.seen if s.path_qs == "/echo"]
    assert ("Authorization", f"Bearer {credential}") in vault.headers
    assert all(token not in value for s in upstream.seen for _, value in s.headers)
    request_ids = {k: r.headers["X-Sluice-Request-Id"] for k, r in replies.items()}
    return Scenario(config, token, credential, sessions.pop(), replies, request_ids, upstream)


def by_request(all_records: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [r for r in all_records if r.get("request_id") == request_id]


# --------------------------------------------------------------------------- the session


@pytest.mark.asyncio
async def test_a_session_is_recorded_in_order_privately_and_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await run_scenario(tmp_path, monkeypatch)
    directory = recordings_dir(tmp_path)
    everything = records(directory)
    kinds = [r["kind"] for r in everything]
    assert kinds[0] == "recorder.file"
    assert kinds[-1] == "checkpoint"  # sealed when the proxy stopped
    seqs = [r["seq"] for r in everything]
    assert seqs == list(range(1, len(seqs) + 1))

    (start,) = [r for r in everything if r["kind"] == "session.start"]
    assert start["session"] == s.session
    assert start["subject"] == "alice"
    first_request = min(r["seq"] for r in everything if r["kind"] == "request")
    assert start["seq"] < first_request

    expected = {
        "canary": ("allowed", 200),
        "denied": ("denied", 403),
        "approved": ("approved", 200),
        "vault": ("allowed", 200),
        "big": ("allowed", 200),
    }
    for name, (action, status) in expected.items():
        flow = by_request(everything, s.request_ids[name])
        # the request record carries its first decision; a held request's outcome follows
        # in a decision record of its own
        outcome = ["decision"] if action == "approved" else []
        assert [r["kind"] for r in flow if not r["kind"].startswith("approval.")] == [
            "request",
            *outcome,
            "response",
        ], (name, [r["kind"] for r in flow])
        request = next(r for r in flow if r["kind"] == "request")
        decisions = [d for r in flow if (d := decision_of(r)) is not None]
        decision = decisions[-1]
        response = next(r for r in flow if r["kind"] == "response")
        assert request["seq"] <= decision["seq"] < response["seq"]
        assert request["session"] == decision["session"] == response["session"] == s.session
        assert decision["action"] == action, (name, decision)
        assert request["action"] == ("held" if outcome else action), (name, request)
        assert response["status"] == status, (name, response)
        if action != "denied":  # forwarded: the response says how long it took
            assert response["duration_ms"] > 0, (name, response)
    approved = by_request(everything, s.request_ids["approved"])
    assert [r["kind"] for r in approved if r["kind"].startswith("approval.")] == [
        "approval.requested",
        "approval.decided",
    ]
    decided = next(r for r in approved if r["kind"] == "approval.decided")
    assert decided["state"] == "approved" and decided["decided_by"] == "local-operator"
    # the decision record itself says who approved, for how long it was held, and the scope
    first = next(r for r in approved if r["kind"] == "request")
    (approval,) = (r for r in approved if r["kind"] == "decision")
    assert first["action"] == "held" and first["seq"] < decided["seq"] < approval["seq"]
    assert approval["approver"] == "local-operator" and approval["scope"] == "once"
    assert approval["approval_id"] == decided["id"] and approval["held_ms"] >= 0
    refused = by_request(everything, s.request_ids["held-denied"])
    decided = next(r for r in refused if r["kind"] == "approval.decided")
    assert decided["state"] == "denied"
    request, decision = (r for r in refused if r["kind"] in ("request", "decision"))
    assert (request["kind"], decision["kind"]) == ("request", "decision")
    # recorded before anyone decided (held), then how it ended
    assert request["seq"] < decided["seq"] < decision["seq"]
    assert request["action"] == "held"
    assert decision["action"] == "denied" and decision["rule"] == "deploys"
    assert decision["approver"] == "local-operator" and decision["held_ms"] >= 0
    answer = next(r for r in refused if r["kind"] == "response")  # what the agent received
    assert answer["status"] == 403 and answer["seq"] > decision["seq"]
    held_request = next(r for r in approved if r["kind"] == "request")
    assert held_request["method"] == "POST"
    assert held_request["body"] == {"text": DEPLOY_BODY.decode()}
    denied = {r["kind"]: r for r in by_request(everything, s.request_ids["denied"])}
    assert denied["request"]["action"] == "denied"
    assert denied["request"]["rule"] == "no-secrets"
    assert json.loads(denied["response"]["body"]["text"])["error"] == "denied"

    # private: every directory 0700, every file 0600 (keys, recordings, blobs)
    for path in [directory, *sorted(p for p in directory.rglob("*") if p.is_dir())]:
        assert mode(path) == 0o700, (path, oct(mode(path)))
    for path in files_under(directory):
        assert mode(path) == 0o600, (path, oct(mode(path)))
    assert list((directory / "blobs").iterdir()), "the big body should be a sidecar"

    result = sluice("verify", str(directory), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert ": verified (" in result.stdout
    pinned = sluice(
        "verify", str(directory), "--public-key", str(directory / "recording-key.pub"), cwd=tmp_path
    )
    assert pinned.returncode == 0, (pinned.stdout, pinned.stderr)

    listed = sluice("sessions", "--json", "-c", str(s.config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["id"] == s.session
    assert row["subject"] == "alice"
    assert row["requests"] == 6
    assert row["denied"] == 2
    assert row["masked"] == 3  # the canary, the big body and the echoed credential
    assert row["integrity"] == "verified"
    for path in files_under(directory):  # the reader's .idx caches are private too
        assert mode(path) == 0o600, (path, oct(mode(path)))


@pytest.mark.asyncio
async def test_sessions_counts_the_requests_that_were_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await run_scenario(tmp_path, monkeypatch)
    listed = sluice("sessions", "--json", "-c", str(s.config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert row["held"] == 2  # /deploy/web (approved) and /deploy/db (denied) were held


@pytest.mark.asyncio
async def test_har_export_holds_the_masked_bodies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await run_scenario(tmp_path, monkeypatch)
    output = tmp_path / "session.har"
    result = sluice("export-har", str(recordings_dir(tmp_path)), "-o", str(output), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert mode(output) == 0o600
    har = json.loads(output.read_text(encoding="utf-8"))
    assert har["log"]["version"] == "1.2"
    assert har["log"]["creator"]["name"] == "sluice"
    entries = {e["_sluice"]["request_id"]: e for e in har["log"]["entries"]}
    assert set(entries) == set(s.request_ids.values())
    for name, request_id in s.request_ids.items():
        if name == "held-denied":
            continue  # no response record: see test_a_request_an_approver_denied_...
        entry = entries[request_id]
        assert entry["response"]["status"] == s.replies[name].status
        # the body the agent received, masked, byte for byte
        assert entry["response"]["content"]["text"].encode() == s.replies[name].body, name
        for key in ("startedDateTime", "time", "request", "response", "cache", "timings"):
            assert key in entry
    canary = entries[s.request_ids["canary"]]["response"]["content"]["text"]
    assert CANARY not in canary and "*" * 20 in canary
    big = entries[s.request_ids["big"]]["response"]["content"]
    assert big["size"] == len(BIG_BODY) and CANARY_BIG not in big["text"]
    approved = entries[s.request_ids["approved"]]
    assert approved["request"]["method"] == "POST"
    assert approved["request"]["postData"]["text"] == DEPLOY_BODY.decode()
    assert [d["action"] for d in approved["_sluice"]["decisions"]] == ["held", "approved"]


@pytest.mark.asyncio
async def test_a_request_an_approver_denied_is_recorded_with_its_response(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await run_scenario(tmp_path, monkeypatch)
    directory = recordings_dir(tmp_path)
    with Recording.open(directory) as recording:
        flow = recording.flow(s.request_ids["held-denied"])
        assert flow is not None and flow.request is not None
        assert flow.response is not None, [r["kind"] for r in flow.errors + flow.other]
        assert flow.response["status"] == 403
        assert recording.body(flow, "response") == s.replies["held-denied"].body
        assert flow.errors == []
        (summary,) = recording.sessions()
        assert summary.errors == 0


@pytest.mark.asyncio
async def test_har_request_urls_are_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await run_scenario(tmp_path, monkeypatch)
    output = tmp_path / "session.har"
    result = sluice("export-har", str(recordings_dir(tmp_path)), "-o", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for entry in json.loads(output.read_text())["log"]["entries"]:
        url = urlsplit(entry["request"]["url"])
        assert url.scheme in ("http", "https") and url.netloc, entry["request"]["url"]


@pytest.mark.asyncio
async def test_no_secret_reaches_the_recordings_the_blobs_or_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    capture_debug(caplog)
    s = await run_scenario(tmp_path, monkeypatch)
    directory = recordings_dir(tmp_path)
    har = tmp_path / "all.har"
    assert sluice("export-har", str(directory), "-o", str(har), cwd=tmp_path).returncode == 0
    # the agent got the canaries masked, never whole
    assert CANARY.encode() not in s.replies["canary"].body
    assert CANARY_BIG.encode() not in s.replies["big"].body
    assert s.credential.encode() not in s.replies["vault"].body  # the upstream echoed it
    signature = s.token.split(".")[2]
    secrets_ = {
        "canary": CANARY,
        "canary in the big body": CANARY_BIG,
        "cookie from the upstream": COOKIE_SECRET,
        "agent token": s.token,
        "agent token signature": signature,
        "injected credential": s.credential,
    }
    places = {path: path.read_bytes() for path in [*files_under(directory), har]}
    assert any(p.parent.name == "blobs" for p in places), "no sidecar blob was written"
    logs = log_text(caplog)
    for what, secret in secrets_.items():
        for path, data in places.items():
            assert secret.encode() not in data, f"{what} in {path.relative_to(tmp_path)}"
        assert secret not in logs, f"{what} in the logs"
    # and the credential headers were kept, redacted
    everything = records(directory)
    request = next(r for r in everything if r.get("request_id") == s.request_ids["vault"])
    assert ["Authorization", "[REDACTED]"] in request["headers"]
    response = next(
        r
        for r in everything
        if r.get("request_id") == s.request_ids["canary"] and r["kind"] == "response"
    )
    assert ["Set-Cookie", "[REDACTED]"] in response["headers"]


@pytest.mark.asyncio
async def test_a_large_body_goes_to_a_sidecar_that_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await run_scenario(tmp_path, monkeypatch)
    directory = recordings_dir(tmp_path)
    with Recording.open(directory) as recording:
        flow = recording.flow(s.request_ids["big"])
        assert flow is not None and flow.response is not None
        ref = flow.response["body"]
        assert set(ref) == {"blob", "size"}, ref
        assert ref["size"] == len(BIG_BODY)
        blob = directory / "blobs" / ref["blob"]
        assert blob.is_file() and mode(blob) == 0o600
        body = recording.body(flow, "response")
        assert body == s.replies["big"].body  # what the agent received, masked
        assert CANARY_BIG.encode() not in body
        assert flow.response["mask_spans"], "the big body's canary was not masked"
        small = recording.flow(s.request_ids["canary"])
        assert small is not None and "text" in small.response["body"]
        assert recording.body(small, "response") == s.replies["canary"].body


@pytest.mark.asyncio
async def test_rotation_across_files_keeps_one_verifiable_chain(tmp_path: Path) -> None:
    async with recording_stack(
        tmp_path, recording={"rotate_size": "64KiB", "checkpoint_every": 20}
    ) as stack:
        for n in range(40):
            reply = await stack.send(f"/api/pad/{6000 + n}")
            assert reply.status == 200
        await stack.settle()
        ids = [e.data["request_id"] for e in stack.events if e.type == "request.received"]
    directory = recordings_dir(tmp_path)
    files = list_recordings(directory)
    assert len(files) >= 4, [p.name for p in files]
    results = verify([directory])
    assert [r.state for r in results] == ["verified"] * len(files), [r.describe() for r in results]
    previous: dict[str, Any] | None = None
    last_hash = None
    for path in files:
        lines = path.read_bytes().splitlines(keepends=True)
        first, last = json.loads(lines[0]), json.loads(lines[-1])
        assert first["kind"] == "recorder.file"
        assert last["kind"] == "checkpoint", path.name  # rotation seals the file it leaves
        if previous is None:
            assert first["prev_file"] is None
        else:
            assert first["prev_file"] == previous["file"]
            assert first["chain"] == previous["chain"]
            assert first["reason"] == "rotation"
            assert first["prev"] == last_hash  # the chain goes on across the files
            assert first["seq"] == previous["last_seq"] + 1
        last_hash = hashlib.sha256(lines[-1]).hexdigest()
        previous = {"file": path.name, "chain": first["chain"], "last_seq": last["seq"]}
    result = sluice("verify", str(directory), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert result.stdout.count(": verified (") == len(files)
    with Recording.open(directory) as recording:
        for request_id in ids:
            flow = recording.flow(request_id)
            assert flow is not None and flow.request is not None and flow.response is not None
        assert recording.counts["requests"] == 40


@pytest.mark.asyncio
async def test_a_streamed_request_body_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    payload = json.dumps({"title": "fix the build", "body": "x" * 3000}).encode()
    upstream = Upstream()
    async with recording_stack(tmp_path, upstream) as stack:
        reply = await stack.send("/api/issues/7/comments", method="POST", body=payload)
        assert reply.status == 200
        await stack.settle()
    assert upstream.seen[-1].body == payload  # forwarded whole
    request_id = reply.headers["X-Sluice-Request-Id"]
    everything = records(recordings_dir(tmp_path))
    with Recording.open(recordings_dir(tmp_path)) as recording:
        flow = recording.flow(request_id)
        assert flow is not None and flow.request is not None
        recorded = recording.body(flow, "request")
    body_records = [
        r for r in everything if r["kind"] == "request.body" and r.get("request_id") == request_id
    ]
    assert recorded == payload or body_records, flow.request


@pytest.mark.asyncio
async def test_har_marks_a_response_cut_at_the_capture_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    async with recording_stack(tmp_path, recording={"capture_limit": "16KiB"}) as stack:
        reply = await stack.send("/api/files/big")
        assert reply.status == 200 and len(reply.body) == len(BIG_BODY)
        await stack.settle()
    request_id = reply.headers["X-Sluice-Request-Id"]
    (response,) = [
        r
        for r in records(recordings_dir(tmp_path))
        if r.get("request_id") == request_id and r["kind"] == "response"
    ]
    assert response["body_truncated_at"] == 16 * 1024  # the record knows
    assert response["body_size"] == len(BIG_BODY)
    output = tmp_path / "cut.har"
    result = sluice("export-har", str(recordings_dir(tmp_path)), "-o", str(output), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (entry,) = json.loads(output.read_text())["log"]["entries"]
    content = entry["response"]["content"]
    assert len(content["text"]) == 16 * 1024
    assert "truncated" in content.get("comment", ""), content.keys()


# --------------------------------------------------------------------------- recorder faults


@pytest.mark.parametrize("how", ["nothing-written", "half-written"])
@pytest.mark.asyncio
async def test_a_failed_recorder_refuses_and_forwards_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    real_write = writer_module._write

    def full_disk(fd: int, data: bytes) -> None:
        if how == "half-written":
            real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    upstream = Upstream()
    async with recording_stack(tmp_path, upstream) as stack:
        assert (await stack.send("/api/files/canary")).status == 200
        await stack.settle()
        health = await stack.admin_get("/api/health")
        assert health["recorder"]["state"] == "ok"
        monkeypatch.setattr(writer_module, "_write", full_disk)
        before = len(upstream.seen)
        answers = [
            await stack.send("/api/things/1"),
            await stack.send("/api/secret/x"),  # a denial must be recorded too
            await stack.send("/vault/things"),
            await stack.send("/api/things/2", method="POST", body=b'{"n": 2}'),
        ]
        for reply in answers:
            assert reply.status == 503, reply.body
            assert reply.json["error"] == "recording_unavailable"
        assert len(upstream.seen) == before, "forwarded without a recording"
        health = await stack.admin_get("/api/health")
        assert health["recorder"]["state"] == "failed"
        assert "ENOSPC" in health["recorder"]["reason"]
        changes = [e.data for e in stack.events if e.type == "recorder.state"]
        assert changes and changes[-1]["state"] == "failed", changes
        assert "ENOSPC" in changes[-1]["reason"]
        # a request that would wait for a person is refused before anyone is asked: it
        # could not be recorded, so no approval could let it through
        held = await stack.send("/api/deploy/x", method="POST", body=DEPLOY_BODY)
        assert held.status == 503, held.body
        assert held.json["error"] == "recording_unavailable"
        assert (await stack.admin_get("/api/approvals"))["approvals"] == []
        assert len(upstream.seen) == before
    monkeypatch.setattr(writer_module, "_write", real_write)

    # a restart repairs what the failure left and records again
    directory = recordings_dir(tmp_path)
    async with recording_stack(tmp_path, upstream, name="again.toml") as stack:
        assert (await stack.send("/api/things/3")).status == 200
        await stack.settle()
        assert (await stack.admin_get("/api/health"))["recorder"]["state"] == "ok"
    result = sluice("verify", str(directory), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    kinds = [r["kind"] for r in records(directory)]
    if how == "half-written":
        assert "repaired tail" in result.stdout
        assert "recorder.recovered" in kinds
        (broken,) = directory.glob("*.broken")
        assert mode(broken) == 0o600
    else:
        assert "recorder.resumed" in kinds
    refused_urls = {"/things/1", "/secret/x", "/things/2"}
    recorded = {r.get("url") for r in records(directory) if r["kind"] == "request"}
    assert not refused_urls & recorded, "a refused request was recorded as if forwarded"


@pytest.mark.asyncio
async def test_a_recorder_that_cannot_open_refuses_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    (tmp_path / "state").mkdir(mode=0o700)
    recordings_dir(tmp_path).write_text("not a directory")  # the recorder cannot open it
    upstream = Upstream()
    async with recording_stack(tmp_path, upstream) as stack:
        for path in ("/api/things/1", "/api/secret/x", "/vault/things"):
            reply = await stack.send(path)
            assert reply.status == 503, reply.body
            assert reply.json["error"] == "recording_unavailable"
        assert upstream.seen == []


@pytest.mark.asyncio
async def test_a_recorder_that_cannot_open_says_so_in_health_and_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    (tmp_path / "state").mkdir(mode=0o700)
    recordings_dir(tmp_path).write_text("not a directory")
    async with recording_stack(tmp_path) as stack:
        health = await stack.admin_get("/api/health")
        changes = [e.data for e in stack.runtime.bus.since(0)[0] if e.type == "recorder.state"]
    assert health["recorder"]["state"] == "failed", health["recorder"]
    assert health["recorder"]["reason"], health["recorder"]
    assert changes and changes[-1]["state"] == "failed", changes


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through a 0500 directory")
@pytest.mark.asyncio
async def test_a_read_only_recordings_directory_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    upstream = Upstream()
    async with recording_stack(tmp_path, upstream, recording={"rotate_size": "4KiB"}) as stack:
        assert (await stack.send("/api/things/0")).status == 200
        await stack.settle()
        os.chmod(recordings_dir(tmp_path), 0o500)  # the next rotation cannot create a file
        try:
            statuses = []
            for n in range(20):
                statuses.append((await stack.send(f"/api/pad/{1000 + n}")).status)
                if statuses[-1] == 503:
                    break
            assert statuses[-1] == 503, statuses
            forwarded = len(upstream.seen)
            assert (await stack.send("/api/things/9")).status == 503
            assert len(upstream.seen) == forwarded
            assert (await stack.admin_get("/api/health"))["recorder"]["state"] == "failed"
        finally:
            os.chmod(recordings_dir(tmp_path), 0o700)


@pytest.mark.asyncio
async def test_recording_disabled_forwards_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    upstream = Upstream()
    async with recording_stack(tmp_path, upstream, recording={"enabled": False}) as stack:
        assert (await stack.send("/api/files/canary")).status == 200
        assert (await stack.send("/api/secret/x")).status == 403
        assert (await stack.send("/vault/things")).status == 200
        assert stack.runtime.tap is None and stack.runtime.recorder is None
        health = await stack.admin_get("/api/health")
        assert health["recorder"]["state"] == "off"
    assert len(upstream.seen) == 2
    assert not recordings_dir(tmp_path).exists()
    assert not (tmp_path / "state" / "recording-signing.pem").exists()


@pytest.mark.asyncio
async def test_the_recorder_comes_back_by_itself_when_the_disk_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRED_ENV, "vault-" + os.urandom(8).hex())
    real_write = writer_module._write

    def full_disk(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    upstream = Upstream()
    async with recording_stack(tmp_path, upstream, recording={"retry_interval": "0.2s"}) as stack:
        assert (await stack.send("/api/things/0")).status == 200
        await stack.settle()
        monkeypatch.setattr(writer_module, "_write", full_disk)
        assert (await stack.send("/api/things/1")).status == 503
        await asyncio.sleep(0.5)  # retries happen, and fail, while the disk is still full
        assert (await stack.admin_get("/api/health"))["recorder"]["state"] == "failed"
        assert (await stack.send("/api/things/2")).status == 503
        seen = len(upstream.seen)
        monkeypatch.setattr(writer_module, "_write", real_write)  # someone freed space
        for _ in range(50):
            if (await stack.admin_get("/api/health"))["recorder"]["state"] == "ok":
                break
            await asyncio.sleep(0.1)
        assert (await stack.admin_get("/api/health"))["recorder"]["state"] == "ok"
        assert (await stack.send("/api/things/3")).status == 200
        assert len(upstream.seen) == seen + 1
        await stack.settle()
        states = [e.data["state"] for e in stack.events if e.type == "recorder.state"]
        assert states[-2:] == ["failed", "ok"], states
    directory = recordings_dir(tmp_path)
    result = sluice("verify", str(directory), cwd=tmp_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    urls = [r.get("url") for r in records(directory) if r["kind"] == "request"]
    assert "/things/3" in urls and "/things/1" not in urls and "/things/2" not in urls
    assert "recorder.resumed" in [r["kind"] for r in records(directory)]
