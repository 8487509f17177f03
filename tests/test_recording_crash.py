"""Crash safety of the recording: ``kill -9`` the proxy under load, again and again.

The proxy runs as a user runs it (``python -m proxy proxy -c CFG``) in front of a real
aiohttp upstream (in this process) that notes every request it receives by a unique id in
the path, with the ``X-Sluice-Request-Id`` Sluice gave it. A few asyncio clients keep it
busy (GETs with small and sidecar-sized answers, POSTs, denied requests) until the proxy is
killed with SIGKILL at a random moment (every 7th cycle it is killed while starting, so
while its recorder opens or repairs). SIGKILL alone cannot cut a small ``write`` short, so
every 4th cycle the newest file is then also torn by hand (part of a record appended: what
a power loss or a short write leaves). Then, every cycle:

* before the next start: every recording file verifies (chain, signatures, and the sidecar
  blobs its records name), or is unsigned or torn *at the tail of the newest file only*
  (``proxy.recording.verify``); "tampered" is a failure, and every file but the newest is
  sealed (verified);
* after the restart (the recorder cuts a torn tail on open): every request the upstream
  ever received has its ``request`` record, with its URL, and its ``allowed`` decision
  (``proxy.recording.Recording``, its index cache extended across the crashes).

At the end the proxy is stopped cleanly: then every file is verified, and a reader without
the index cache agrees with the cached one. ``crash_loop`` is shared with the soak script
``tests/benchmarks/soak_recording_crash.py``. Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp import web
from helpers import LOOPBACK, config_text, upstream_app

import proxy
from proxy.recording import Recording, verify
from proxy.recording.files import list_recordings
from proxy.recording.verify import REPAIRED, TORN, UNSIGNED, VERIFIED

SOURCE_ROOT = Path(proxy.__file__).resolve().parent.parent
#: What a file may be in after a kill: anything but tampered.
AFTER_KILL = frozenset({VERIFIED, UNSIGNED, TORN, REPAIRED})
SEALED = frozenset({VERIFIED, REPAIRED})
WORKERS = 4
SMALL = b"ok " * 20
SIDECAR = b"s" * 3000  # above max_inline_body = 1KiB: written as a blob first

RULES = [
    {"name": "no-secrets", "action": "deny", "target": "api", "path": "/secret/**"},
    {"name": "the-rest", "action": "allow"},
]


class CrashFailure(AssertionError):
    pass


# --------------------------------------------------------------------------- the upstream


@dataclass
class CountingUpstream:
    """Notes every request it receives: unique id (from the path) -> Sluice's request id."""

    received: dict[str, str] = field(default_factory=dict)
    duplicates: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/items/{uid}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        if uid in self.received:
            self.duplicates.append(uid)
        self.received[uid] = request.headers.get("X-Sluice-Request-Id", "")
        await request.read()
        body = SIDECAR if uid.endswith("5") else SMALL
        return web.Response(body=body, content_type="text/plain")


# --------------------------------------------------------------------------- the proxy


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def crash_config(workdir: Path, upstream: str) -> Path:
    document = tomllib.loads(config_text(workdir, upstreams={"api": upstream}, rules=RULES))
    document["recording"] = {
        "rotate_size": "256KiB",  # rotations happen under load, and get killed too
        "checkpoint_every": 50,
        "max_inline_body": "1KiB",
    }
    path = workdir / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


async def spawn_proxy(config: Path, log: Path) -> asyncio.subprocess.Process:
    err = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "proxy",
            "-c",
            str(config),
            "--listen",
            f"{LOOPBACK}:0",
            "--admin-listen",
            f"{LOOPBACK}:0",
            cwd=config.parent,
            env=child_env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    finally:
        os.close(err)


async def start_proxy(config: Path, log: Path) -> tuple[asyncio.subprocess.Process, str]:
    """Start the proxy and wait until it listens (its recorder is open by then)."""
    process = await spawn_proxy(config, log)
    assert process.stdout is not None
    try:
        async with asyncio.timeout(20):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise CrashFailure(f"the proxy exited before listening; see {log}")
                if found := re.search(r"listening on (http://\S+)", line):
                    return process, found.group(1)
    except BaseException:
        await kill(process)
        raise


async def kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), 10)


# --------------------------------------------------------------------------- the load


@dataclass
class Load:
    sent: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0


async def drive(url: str, cycle: int, stop: asyncio.Event, load: Load, rng: random.Random) -> None:
    """``WORKERS`` clients, each sending one request after another until ``stop``."""
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, trust_env=False
    ) as client:

        async def worker(number: int) -> None:
            sequence = 0
            while not stop.is_set():
                uid = f"c{cycle:05d}w{number}n{sequence:06d}"
                sequence += 1
                roll = rng.random()
                if roll < 0.1:
                    method, path, body = "GET", f"/api/secret/{uid}", None
                elif roll < 0.3:
                    method, path, body = "POST", f"/api/items/{uid}", b'{"n": %d}' % sequence
                else:
                    method, path, body = "GET", f"/api/items/{uid}", None
                load.sent += 1
                try:
                    async with client.request(method, url + path, data=body) as reply:
                        await reply.read()
                        load.statuses[reply.status] += 1
                except (aiohttp.ClientError, OSError, TimeoutError):
                    load.failures += 1
                    await asyncio.sleep(0.005)

        await asyncio.gather(*(worker(n) for n in range(WORKERS)))


# --------------------------------------------------------------------------- the checks


def check_after_kill(directory: Path, cycle: int) -> dict[str, Any]:
    """No file is tampered; only the newest may be unsigned or torn."""
    results = verify([directory])
    states = Counter(result.state for result in results)
    for number, result in enumerate(results):
        if result.state not in AFTER_KILL:
            raise CrashFailure(f"cycle {cycle}: {result.describe()}")
        if number < len(results) - 1 and result.state not in SEALED:
            raise CrashFailure(f"cycle {cycle}: an older file is not sealed: {result.describe()}")
    newest = results[-1] if results else None
    return {"files": len(results), "states": dict(states), "newest": newest and newest.state}


def tear_newest(directory: Path, rng: random.Random) -> str | None:
    """What a write cut short leaves (power loss, a kernel short write on SIGKILL): the
    newest file ends in part of a record. Returns the file's name, or None if none."""
    files = list_recordings(directory)
    if not files:
        return None
    newest = files[-1]
    data = newest.read_bytes()
    lines = data.split(b"\n")
    model = lines[-2] if len(lines) > 1 else b'{"v":1,"seq":1,"ts":1.0,"prev":"00"}'
    with open(newest, "ab") as handle:
        handle.write(model[: rng.randint(1, max(1, len(model) - 1))])
    return newest.name


def check_recorded(
    directory: Path,
    received: dict[str, str],
    fresh: list[str],
    *,
    cache: bool,
    label: str,
) -> int:
    """Every request the upstream ever received is in the index; the ``fresh`` ones (those
    received since the last check) are read back: request record, URL, decision."""
    with Recording.open(directory, cache=cache) as recording:
        indexed: set[str] = set()
        for index in recording.indexes:
            indexed.update(index.request_ids)
        lost = [uid for uid, request_id in received.items() if request_id not in indexed]
        if lost:
            raise CrashFailure(
                f"{label}: the upstream received {len(lost)} requests that have no record, "
                f"e.g. {lost[0]} (request id {received[lost[0]]})"
            )
        for uid, (request, actions) in read_back(recording, [received[u] for u in fresh], fresh):
            request_id = received[uid]
            if request is None:
                raise CrashFailure(
                    f"{label}: the upstream received {uid} (request id {request_id}) "
                    "but no request record exists"
                )
            if request.get("url") != f"/items/{uid}":
                raise CrashFailure(f"{label}: request {request_id} recorded as {request}")
            if actions[:1] != ["allowed"]:
                raise CrashFailure(f"{label}: request {request_id} decided {actions}")
        return recording.counts.get("requests", 0)


def read_back(
    recording: Recording, request_ids: list[str], uids: list[str]
) -> list[tuple[str, tuple[dict[str, Any] | None, list[Any]]]]:
    """``(uid, (request record, decision actions))`` for each request id: by index lookups
    for a few, by one pass over every record for many (a lookup visits every file)."""
    found: dict[str, tuple[dict[str, Any] | None, list[Any]]] = {}
    if len(request_ids) <= 5000:
        for request_id in request_ids:
            flow = recording.flow(request_id)
            if flow is not None:
                found[request_id] = (flow.request, [d.get("action") for d in flow.decisions])
    else:
        wanted = set(request_ids)
        for record in recording.iter_range():
            request_id = record.get("request_id")
            if request_id not in wanted:
                continue
            request, actions = found.setdefault(request_id, (None, []))
            if record["kind"] == "request" and request is None:
                found[request_id] = (record, actions)
            elif record["kind"] == "decision":
                actions.append(record.get("action"))
    return [
        (uid, found.get(request_id, (None, [])))
        for uid, request_id in zip(uids, request_ids, strict=True)
    ]


def forwarded_from_the_files(directory: Path) -> dict[str, str]:
    """uid -> request id of every request record, from the raw lines (no reader, no index)."""
    found = {}
    for path in list_recordings(directory):
        for line in path.read_bytes().split(b"\n"):
            if b'"kind":"request"' not in line:
                continue
            record = json.loads(line)
            url = str(record.get("url") or "")
            if record["kind"] == "request" and url.startswith("/items/"):
                found[url.removeprefix("/items/")] = record["request_id"]
    return found


# --------------------------------------------------------------------------- the loop


@dataclass
class CycleResult:
    cycle: int
    ran_for: float
    early_kill: bool
    torn_after: bool
    sent: int
    forwarded: int
    statuses: dict[int, int]
    failures: int
    files: int
    states: dict[str, int]
    newest: str | None
    restart_s: float


@dataclass
class Summary:
    seed: int
    cycles: list[CycleResult] = field(default_factory=list)
    forwarded: int = 0
    recorded_requests: int = 0
    final_states: dict[str, int] = field(default_factory=dict)
    torn_seen: int = 0
    tears: int = 0
    repaired_files: int = 0
    broken_copies: int = 0
    seconds: float = 0.0


async def crash_loop(
    workdir: Path,
    cycles: int,
    *,
    seed: int,
    load_seconds: tuple[float, float] = (0.3, 0.8),
    early_every: int = 7,
    tear_every: int = 4,
    on_cycle: Callable[[CycleResult], None] | None = None,
) -> Summary:
    rng = random.Random(seed)
    summary = Summary(seed)
    started = time.monotonic()
    upstream = CountingUpstream()
    log = workdir / "proxy.log"
    async with upstream_app(upstream.app()) as upstream_url:
        config = crash_config(workdir, upstream_url)
        directory = workdir / "state" / "recordings"
        checked = 0  # received requests read back so far (dicts keep arrival order)
        hand_torn = False  # the newest file has a tail torn by hand, not repaired yet
        for cycle in range(cycles):
            load, stop = Load(), asyncio.Event()
            before = len(upstream.received)
            began = time.monotonic()
            if cycle % early_every == early_every - 1:  # killed while opening or repairing
                process = await spawn_proxy(config, log)
                ran_for = rng.uniform(0.0, 0.45)
                await asyncio.sleep(ran_for)
                await kill(process)
                restart_s, early = 0.0, True
            else:
                process, url = await start_proxy(config, log)
                restart_s, early = time.monotonic() - began, False
                driver: asyncio.Task[None] | None = None
                try:
                    if summary.cycles:  # the restart has repaired what the last kill left
                        fresh = list(upstream.received)[checked:]
                        check_recorded(
                            directory, upstream.received, fresh, cache=True, label=f"cycle {cycle}"
                        )
                        checked += len(fresh)
                    driver = asyncio.create_task(drive(url, cycle, stop, load, rng))
                    ran_for = rng.uniform(*load_seconds)
                    await asyncio.sleep(ran_for)
                finally:
                    await kill(process)
                    stop.set()
                    if driver is not None:
                        await asyncio.wait_for(driver, 15)
                await asyncio.sleep(0.05)  # requests already in the upstream's socket land
            found = check_after_kill(directory, cycle)
            if not early:
                hand_torn = False  # that start repaired any tail torn by hand before it
            if found["newest"] == TORN and not hand_torn:
                summary.torn_seen += 1  # SIGKILL itself cut a write short
            torn = None
            if cycle % tear_every == tear_every // 2:
                torn = tear_newest(directory, rng)
                if torn is not None:
                    summary.tears += 1
                    hand_torn = True
                    again = check_after_kill(directory, cycle)
                    if again["newest"] != TORN:
                        raise CrashFailure(f"cycle {cycle}: a torn {torn} verified as {again}")
            result = CycleResult(
                cycle,
                round(ran_for, 3),
                early,
                torn is not None,
                load.sent,
                len(upstream.received) - before,
                dict(load.statuses),
                load.failures,
                found["files"],
                found["states"],
                found["newest"],
                round(restart_s, 3),
            )
            summary.cycles.append(result)
            if on_cycle is not None:
                on_cycle(result)
        # one last start: it repairs, records a little more, and stops cleanly
        process, url = await start_proxy(config, log)
        try:
            load, stop = Load(), asyncio.Event()
            driver = asyncio.create_task(drive(url, cycles, stop, load, rng))
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.wait_for(driver, 15)
            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), 15)
        finally:
            await kill(process)
        if code != 0:
            raise CrashFailure(f"the last proxy exited {code} on SIGTERM; see {log}")
    if upstream.duplicates:
        raise CrashFailure(f"the upstream received some requests twice: {upstream.duplicates[:5]}")
    results = verify([directory])
    summary.final_states = dict(Counter(r.state for r in results))
    summary.repaired_files = sum(1 for r in results if r.state == REPAIRED)
    summary.broken_copies = len(list(directory.glob("*.broken")))
    bad = [r.describe() for r in results if not r.ok]
    if bad:
        raise CrashFailure("after a clean stop, not every file is sealed:\n" + "\n".join(bad))
    every = list(upstream.received)
    cached = check_recorded(directory, upstream.received, every, cache=True, label="final (cached)")
    fresh = check_recorded(directory, upstream.received, every, cache=False, label="final (built)")
    if cached != fresh:
        raise CrashFailure(f"the cached index counts {cached} requests, a fresh one {fresh}")
    from_files = forwarded_from_the_files(directory)
    missing = {uid for uid in upstream.received if from_files.get(uid) != upstream.received[uid]}
    if missing:
        shown = sorted(missing)[:5]
        raise CrashFailure(f"raw lines lack {len(missing)} forwarded requests: {shown}")
    summary.forwarded = len(upstream.received)
    summary.recorded_requests = fresh
    summary.seconds = round(time.monotonic() - started, 1)
    return summary


# --------------------------------------------------------------------------- the test


@pytest.mark.timeout(110)
@pytest.mark.asyncio
async def test_kill_9_under_load_loses_no_forwarded_request_and_tampers_nothing(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("SLUICE_CRASH_SEED", time.time_ns() % 1_000_000))
    try:
        summary = await asyncio.wait_for(crash_loop(tmp_path, 20, seed=seed), 100)
    except CrashFailure as exc:
        raise CrashFailure(f"seed {seed}: {exc}") from None
    assert len(summary.cycles) == 20
    assert summary.forwarded > 100, summary  # the load really went through
    assert sum(1 for c in summary.cycles if c.forwarded) >= 15, summary.cycles
    assert summary.recorded_requests >= summary.forwarded
    assert sum(c.early_kill for c in summary.cycles) == 2
    assert summary.tears == 5 and summary.repaired_files >= 1, summary
    assert set(summary.final_states) <= SEALED, summary.final_states
