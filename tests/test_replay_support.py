"""Recordings for the replay tests, made by real proxy runs, and what the tests do to them.

* ``demo_run()``: ``python -m proxy demo --pause 0`` on a copy of the sample config (free
  ports, its own state dir): allowed, denied, held-then-denied, masked and exfiltration
  requests, recorded by the real recorder. Run once per test session.
* ``incident_run()``: ``python -m proxy proxy`` in front of a real aiohttp upstream that
  answers 500 on ``/boom`` and leaks a token on ``/leak``, plus a target whose upstream is
  down (502): the failed and masked events.
* ``normalized_copy()``: the demo recording with its volatile values (times, ids, ports,
  random secrets, the key) replaced by fixed ones, re-chained and re-signed, so snapshots
  are stable while the content still comes from a real run.
* ``tampered_copy()``: a copy with one byte flipped inside one record's body.

The checks at the end test these helpers themselves.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import ClientSession, web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers import closed_port_url, config_text, upstream_app

from proxy.masking.fakes import fake
from proxy.recording import format as fmt
from proxy.recording import verify
from proxy.recording.files import file_name
from proxy.recording.keys import Signer, publish_public_key
from tests.test_proxy_cli import child_env, demo_config

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
LEAKED = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"  # fixed; the rule only needs the shape
#: A fixed, well-formed npm token (valid checksum) for the one the demo agent tries to leak.
NPM_TOKEN = fake("npm-token", random.Random(7))[1]
_cache: dict[str, Any] = {}


@dataclass(frozen=True)
class Run:
    root: Path
    config: Path
    recordings: Path
    #: What the agent received, by path (incident run only): (status, body).
    received: dict[str, tuple[int, bytes]] = field(default_factory=dict)


def _scratch(name: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"sluice-replay-{name}-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def demo_run() -> Run:
    """The bundled demo, run once by the real proxy; its recordings directory."""
    if "demo" not in _cache:
        root = _scratch("demo")
        config = demo_config(root)
        result = subprocess.run(
            [sys.executable, "-m", "proxy", "demo", "--pause", "0", "-c", str(config)],
            cwd=root,
            env=child_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        _cache["demo"] = Run(root, config, root / "demo-state" / "recordings")
    return _cache["demo"]


async def _incident(root: Path, received: dict[str, tuple[int, bytes]]) -> Path:
    from test_console_live import ProxyProcess

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if request.path.endswith("/boom"):
            return web.json_response({"error": "upstream exploded"}, status=500)
        if request.path.endswith("/cut"):  # promises 1000 bytes, sends 10, hangs up
            response = web.StreamResponse(headers={"Content-Length": "1000"})
            await response.prepare(request)
            await response.write(b"0123456789")
            assert request.transport is not None
            request.transport.close()
            return response  # type: ignore[return-value]
        if request.path.endswith("/leak"):
            return web.Response(text=f"deploy log\nGITHUB_TOKEN={LEAKED}\ndone\n")
        return web.json_response({"ok": True, "path": request.path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with upstream_app(app) as url:
        text = config_text(
            root,
            upstreams={"api": url, "down": closed_port_url()},
            rules=[
                {"name": "no-admin", "action": "deny", "path": "/admin/**"},
                {"name": "all", "action": "allow"},
            ],
        )
        config = root / "sluice.toml"
        config.write_text(text, encoding="utf-8")
        proxy = ProxyProcess(config, root / "state")
        await proxy.start()
        try:
            async with ClientSession() as client:
                for method, path in (
                    ("GET", "/api/ok"),
                    ("GET", "/api/boom"),
                    ("GET", "/api/leak"),
                    ("GET", "/down/anything"),
                    ("GET", "/api/admin/users"),
                    ("POST", "/api/items"),
                    ("GET", "/api/x/[/admin]/[bold]y"),
                    ("GET", "/api/cut"),
                ):
                    with contextlib.suppress(aiohttp.ClientError):
                        async with client.request(
                            method, proxy.main_url + path, data=b'{"name": "x"}'
                        ) as response:
                            received[path] = (response.status, await response.read())
        finally:
            await proxy.stop()
    return root / "state" / "recordings"


def incident_run() -> Run:
    """A real proxy with a failing upstream, a down upstream and a leaked token."""
    if "incident" not in _cache:
        root = _scratch("incident")
        received: dict[str, tuple[int, bytes]] = {}
        with ThreadPoolExecutor(1) as pool:  # callers may be inside an event loop already
            recordings = pool.submit(asyncio.run, _incident(root, received)).result(120)
        _cache["incident"] = Run(root, root / "sluice.toml", recordings, received)
    return _cache["incident"]


# -- copies ---------------------------------------------------------------------------------


def records_of(directory: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.jsonl")):
        out.extend(json.loads(line) for line in path.read_bytes().splitlines() if line)
    return out


def _same_length(old: str, prefix: str, n: int) -> str:
    return (prefix + f"{n:0{max(1, len(old) - len(prefix))}d}")[-len(old) :] if old else old


def normalized_copy(source: Path, target: Path) -> Path:
    """The recording with fixed times, ids, ports, secrets and key; re-chained and signed."""
    records = [r for r in records_of(source) if r["kind"] not in (fmt.CHECKPOINT, fmt.FILE_START)]
    swaps: dict[str, str] = {}
    counters: dict[str, int] = {}

    def swap(value: Any, prefix: str) -> None:
        if isinstance(value, str) and value and value not in swaps:
            counters[prefix] = counters.get(prefix, 0) + 1
            swaps[value] = _same_length(value, prefix, counters[prefix])

    for record in records:
        swap(record.get("request_id"), "req")
        swap(record.get("session"), "demo-agent/s")
        swap(record.get("token_id"), "tok")
        swap(record.get("id"), "ap-")
        for span in record.get("mask_spans") or []:
            swap(span.get("fingerprint"), "f")
        for name, value in record.get("headers") or []:
            if name.lower() == "host":
                swaps.setdefault(value, "127.0.0.1:8700")
            if name.lower() == "date":
                swaps.setdefault(value, "Thu, 01 Jan 2026 00:00:00 GMT")
    pattern = re.compile("|".join(re.escape(k) for k in sorted(swaps, key=len, reverse=True)))
    npm = re.compile(r"npm_[A-Za-z0-9]{36}")
    stamps = re.compile(r'"(created|deadline|decided_at)": \d+(\.\d+)?')
    target.mkdir(parents=True, exist_ok=True)
    signer = Signer(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
    publish_public_key(target, signer)
    path = target / file_name(T0, 1)
    head, lines = fmt.GENESIS, []

    def put(seq: int, kind: str, fields: dict[str, Any]) -> None:
        nonlocal head
        ts = T0 + seq * 0.25
        if kind == fmt.CHECKPOINT:
            record = fmt.make_checkpoint(
                seq, ts, head, from_seq=1, chain="c0ffee", key_id=signer.key_id, sign=signer.sign
            )
        else:
            record = fmt.build_record(seq, ts, head, kind, fields)
        line = fmt.encode_record(record)
        lines.append(line)
        head = fmt.line_hash(line)

    put(1, fmt.FILE_START, {"file": path.name, "index": 1, "chain": "c0ffee", "prev_file": None})
    for seq, record in enumerate(records, start=2):
        fields = {k: v for k, v in record.items() if k not in fmt.HEAD_KEYS}
        text = pattern.sub(lambda m: swaps[m.group(0)], json.dumps(fields))
        text = npm.sub(NPM_TOKEN, text)
        text = stamps.sub(lambda m: f'"{m.group(1)}": {T0}', text)
        put(seq, record["kind"], json.loads(text))
    put(len(records) + 2, fmt.CHECKPOINT, {})
    path.write_bytes(b"".join(lines))
    path.chmod(0o600)
    return target


def tampered_copy(source: Path, target: Path, seq: int, needle: bytes) -> Path:
    """A copy of the recordings (key included) with one byte of record ``seq`` flipped."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith(".idx"):
            shutil.copy2(item, target / item.name)
    for path in target.glob("*.jsonl"):
        data = bytearray(path.read_bytes())
        start = 0
        for line in bytes(data).splitlines(keepends=True):
            if json.loads(line)["seq"] == seq:
                at = data.index(needle, start)
                data[at] ^= 0x20  # flip the case of one letter inside the record
                path.write_bytes(bytes(data))
                return target
            start += len(line)
    raise AssertionError(f"no record {seq} holds {needle!r}")


def flipped_config(source: Path, target: Path) -> Path:
    """The demo config without its credential-files rule: reading .env becomes allowed."""
    data = tomllib.loads(source.read_text())
    data["rules"] = [rule for rule in data["rules"] if rule["name"] != "credential-files"]
    target.write_text(tomli_w.dumps(data))
    return target


def seq_of(directory: Path, kind: str, **match: Any) -> int:
    for record in records_of(directory):
        if record["kind"] == kind and all(record.get(k) == v for k, v in match.items()):
            return int(record["seq"])
    raise AssertionError(f"no {kind} record with {match}")


def url_seq(directory: Path, url: str) -> int:
    return seq_of(directory, fmt.REQUEST, url=url)


# -- the helpers themselves -------------------------------------------------------------------


def test_the_normalized_copy_verifies_and_keeps_the_real_content(tmp_path: Path) -> None:
    run = demo_run()
    copy = normalized_copy(run.recordings, tmp_path / "norm")
    (result,) = verify([copy])
    assert result.state == "verified", result.describe()
    original = records_of(run.recordings)
    again = records_of(copy)
    kinds = [r["kind"] for r in original if r["kind"] not in (fmt.CHECKPOINT, fmt.FILE_START)]
    assert [r["kind"] for r in again[1:-1]] == kinds
    masked = [r for r in again if r.get("mask_spans")]
    assert masked and masked[0]["mask_spans"][0]["rule"] == "github-pat"
    assert (
        normalized_copy(run.recordings, tmp_path / "again").joinpath(file_name(T0, 1)).read_bytes()
        == (copy / file_name(T0, 1)).read_bytes()
    )


def test_the_tampered_copy_fails_at_that_seq(tmp_path: Path) -> None:
    run = demo_run()
    seq = url_seq(run.recordings, "/api/builds/latest")
    copy = tampered_copy(run.recordings, tmp_path / "bad", seq, b"User-Agent")
    (result,) = verify([copy])
    assert (result.state, result.first_bad_seq) == ("tampered", seq)


def test_the_incident_run_recorded_failures_and_a_masked_token() -> None:
    records = records_of(incident_run().recordings)
    statuses = {r.get("url"): None for r in records if r["kind"] == fmt.REQUEST}
    assert "/ok" in statuses and "/boom" in statuses
    responses = [r for r in records if r["kind"] == fmt.RESPONSE]
    assert {500, 502} <= {r["status"] for r in responses}
    assert any(r.get("mask_spans") for r in responses)
    with contextlib.suppress(StopIteration):
        leaked = next(r for r in responses if r.get("mask_spans"))
        assert LEAKED not in json.dumps(leaked)
