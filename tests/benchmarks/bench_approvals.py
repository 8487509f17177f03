#!/usr/bin/env python3
"""Approval latency: from an approver's decision to the request reaching the upstream.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_approvals.py [--quick] [--subprocess] [-n N]

A real aiohttp upstream and a real Sluice run on 127.0.0.1: by default the proxy runtime
runs in this process (its own listeners, sockets and event loop tasks, as
``python -m proxy proxy`` would build them); with ``--subprocess`` it runs as
``python -m proxy proxy`` in a child process. One at a time, N requests (200, or 50 with
``--quick``) hit a rule with ``action = "approve"``; once each is on the desk the script
takes a timestamp, sends ``POST /api/approvals/{id}`` with ``{"decision": "approve"}``
and the upstream handler takes a second timestamp the moment the request reaches it.
The upstream runs in this process, so both timestamps come from the same clock.

Prints p50/p99/max of that latency in milliseconds and PASS/MISS against the target
(p99 < 20 ms). The exit status is 0 unless something crashed: missing the target is a
result, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parents[2]
TARGET_P99_MS = 20.0
LOOPBACK = "127.0.0.1"
WARMUP = 5
BODY = json.dumps({"service": "web", "env": "prod", "replicas": 3}).encode()


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the value at or above ``pct`` of the samples)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


class Upstream:
    """Notes when each request arrives; the request path carries its sequence number."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.bodies_ok = True
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        at = time.perf_counter()
        self.arrived[request.match_info["tail"]] = at
        if await request.read() != BODY:
            self.bodies_ok = False
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, LOOPBACK, 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def write_config(workdir: Path, upstream: str) -> Path:
    document: dict[str, Any] = {
        "proxy": {
            "listen": f"{LOOPBACK}:0",
            "admin_listen": f"{LOOPBACK}:0",
            "state_dir": str(workdir / "state"),
            "drain_timeout": "2s",
        },
        "identity": {"mode": "none"},
        "approvals": {"timeout": "30s", "max_pending": 100},
        "targets": [{"name": "api", "upstream": upstream}],
        "rules": [
            {"name": "deploys", "action": "approve", "method": "POST", "path": "/deploy/**"},
            {"name": "the-rest", "action": "deny"},
        ],
    }
    path = workdir / "sluice.toml"
    path.write_text(tomli_w.dumps(document), encoding="utf-8")
    return path


class InProcess:
    """The proxy runtime in this event loop; held requests are seen on its event bus."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.runtime: Any = None
        self.held: asyncio.Queue[str] = asyncio.Queue()
        self.main_url = self.admin_url = self.token = ""

    async def start(self) -> None:
        from proxy.config import load_config
        from proxy.server.runtime import ProxyRuntime
        from proxy.state import ADMIN_TOKEN_FILE

        self.runtime = ProxyRuntime(load_config(self.config_path), watch=False)
        await self.runtime.start()
        self.runtime.bus.add_listener(self._on_event)
        self.main_url, self.admin_url = self.runtime.main_url, self.runtime.admin_url
        self.token = (self.runtime.state_dir / ADMIN_TOKEN_FILE).read_text().strip()

    def _on_event(self, event: Any) -> None:
        if event.type == "approval.requested":
            self.held.put_nowait(event.data["id"])

    async def next_held(self, _client: aiohttp.ClientSession) -> str:
        return await asyncio.wait_for(self.held.get(), 10)

    async def stop(self) -> None:
        if self.runtime is not None:
            await asyncio.wait_for(self.runtime.stop(), 15)


class Subprocess:
    """``python -m proxy proxy`` in a child; held requests are found with GET /api/approvals."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = config_path.with_name("sluice.log")
        self.main_url = self.admin_url = self.token = ""

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.log, "wb") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "proxy", "proxy", "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.config_path.parent,
                env=env,
            )

    async def start(self) -> None:
        self.proc = self._spawn()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            listening = re.search(r"listening on (http://\S+)", text)
            admin = re.search(r"admin API on (http://\S+)", text)
            if listening and admin:
                self.main_url, self.admin_url = listening.group(1), admin.group(1)
                state = self.config_path.parent / "state"
                self.token = (state / "admin.token").read_text().strip()
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"the proxy did not start; its output:\n{self.log.read_text()}")

    async def next_held(self, client: aiohttp.ClientSession) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            async with client.get(
                f"{self.admin_url}/api/approvals",
                headers={"Authorization": f"Bearer {self.token}"},
            ) as reply:
                pending = (await reply.json())["approvals"]
            if pending:
                return str(pending[0]["id"])
            await asyncio.sleep(0.002)
        raise RuntimeError("no request was held within 10 s")

    async def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        for _ in range(100):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        proc.kill()
        proc.wait(5)


async def one_round(
    index: int,
    proxy: InProcess | Subprocess,
    upstream: Upstream,
    agent: aiohttp.ClientSession,
    approver: aiohttp.ClientSession,
) -> tuple[float, float]:
    """(decision -> upstream, decision -> agent has its answer), in seconds."""
    key = f"deploy/{index}"

    async def send() -> int:
        async with agent.post(f"{proxy.main_url}/api/{key}", data=BODY) as reply:
            await reply.read()
            return reply.status

    request = asyncio.create_task(send())
    approval_id = await proxy.next_held(approver)
    sent = time.perf_counter()
    async with approver.post(
        f"{proxy.admin_url}/api/approvals/{approval_id}",
        json={"decision": "approve", "scope": "once", "reason": "benchmark"},
        headers={"Authorization": f"Bearer {proxy.token}"},
    ) as reply:
        if reply.status != 200:
            raise RuntimeError(f"decision answered {reply.status}: {await reply.text()}")
        await reply.read()
    status = await asyncio.wait_for(request, 10)
    answered = time.perf_counter()
    if status != 200:
        raise RuntimeError(f"approved request {index} answered {status}")
    arrived = upstream.arrived.get(key)
    if arrived is None:
        raise RuntimeError(f"approved request {index} never reached the upstream")
    return arrived - sent, answered - sent


def report(label: str, seconds: list[float]) -> tuple[float, float, float]:
    ms = [value * 1000 for value in seconds]
    p50, p99, worst = percentile(ms, 50), percentile(ms, 99), max(ms)
    print(
        f"  {label:<28} p50 {p50:7.2f} ms   p99 {p99:7.2f} ms   max {worst:7.2f} ms"
        f"   (mean {statistics.fmean(ms):.2f} ms)"
    )
    return p50, p99, worst


async def run(count: int, use_subprocess: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="sluice-bench-approvals-") as temp:
        workdir = Path(temp)
        upstream = Upstream()
        await upstream.start()
        config_path = write_config(workdir, upstream.url)
        proxy: InProcess | Subprocess = (
            Subprocess(config_path) if use_subprocess else InProcess(config_path)
        )
        timeout = aiohttp.ClientTimeout(total=30)
        try:
            await proxy.start()
            async with (
                aiohttp.ClientSession(trust_env=False, timeout=timeout) as agent,
                aiohttp.ClientSession(trust_env=False, timeout=timeout) as approver,
            ):
                for index in range(WARMUP):
                    await one_round(-1 - index, proxy, upstream, agent, approver)
                to_upstream: list[float] = []
                to_agent: list[float] = []
                started = time.perf_counter()
                for index in range(count):
                    reached, answered = await one_round(index, proxy, upstream, agent, approver)
                    to_upstream.append(reached)
                    to_agent.append(answered)
                elapsed = time.perf_counter() - started
        finally:
            await proxy.stop()
            await upstream.stop()
        mode = "python -m proxy proxy (child process)" if use_subprocess else "in-process runtime"
        print(f"Sluice approvals benchmark: {count} held requests, one at a time ({mode})")
        print(f"  {elapsed:.2f} s for the run; {WARMUP} warm-up rounds not counted")
        _, p99, _ = report("decision -> upstream", to_upstream)
        report("decision -> agent answered", to_agent)
        if not upstream.bodies_ok:
            print("  WARNING: the upstream received a body that differs from the one held")
        verdict = "PASS" if p99 < TARGET_P99_MS else "MISS"
        print(f"  target p99 < {TARGET_P99_MS:g} ms: {verdict} ({p99:.2f} ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 requests instead of 200")
    parser.add_argument("-n", type=int, default=None, help="number of held requests")
    parser.add_argument(
        "--subprocess",
        action="store_true",
        help="run the proxy as `python -m proxy proxy` in a child process",
    )
    args = parser.parse_args(argv)
    count = args.n if args.n is not None else (50 if args.quick else 200)
    if count < 1:
        parser.error("-n must be at least 1")
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        asyncio.run(run(count, args.subprocess))
    except KeyboardInterrupt:
        return 130
    except Exception:
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        raise SystemExit(main())
