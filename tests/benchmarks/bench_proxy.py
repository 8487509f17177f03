#!/usr/bin/env python3
"""Throughput benchmark: Sluice against a bare aiohttp pass-through proxy and the upstream.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_proxy.py [--quick] [--json FILE]

In one run, with each server in its own process on 127.0.0.1, it measures

* (a) ``direct``: the load generator talks to the aiohttp upstream itself;
* (b) ``minimal``: a bare aiohttp pass-through proxy defined in this file (the floor);
* (c) ``sluice``: ``python -m proxy proxy`` with a generated 20-rule policy whose
  matching allow rule comes last, so every request is tested against all 20 rules;

requests/s and p50/p99 latency at concurrency 1 and 32 for a ``GET`` of a 1 KiB body,
then streams a 1 GiB body through each and reports MB/s and the serving process's RSS
(baseline before the transfer and peak during it, sampled every 50 ms).

The load generator is wrk (installed with apt-get when missing and we are root); if that
is impossible, a small asyncio HTTP/1.1 client in a separate process stands in, and the
report says so. The exit status is 0 unless something crashed: missing a target is a
result, not a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CHUNK = 256 * 1024
BODY_1K = (b"package main // sluice benchmark filler line\n" * 24)[:1024]
GIB = 1 << 30
MIB = 1 << 20

#: The request every throughput case sends (relative to the server's root). Through
#: Sluice it is prefixed with the target name; the upstream sees the same path either way.
THROUGHPUT_PATH = "/api/files/src/cmd/server/main.go?ref=main"
STREAM_PATH = "/api/files/assets/blob.bin?ref=main&bytes={size}"
TARGET = "repo"

RSS_TARGET_MIB = 64.0
NOISE_PCT = 15
RATIO_TARGET = 0.8


# --------------------------------------------------------------------------------------
# Child roles: the upstream and the minimal proxy run as `bench_proxy.py --role ...`.
# --------------------------------------------------------------------------------------


def _listen_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve_forever(app: Any) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    sock = _listen_socket()
    await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"READY {sock.getsockname()[1]}", flush=True)
    await stop.wait()
    await runner.cleanup()


def role_upstream() -> None:
    """A repo-ish upstream: 1 KiB for any GET, or ``?bytes=N`` streamed in 256 KiB chunks."""
    from aiohttp import web

    chunk = bytes(CHUNK)

    async def handle(request: web.Request) -> web.StreamResponse:
        wanted = request.query.get("bytes")
        if wanted is None:
            return web.Response(body=BODY_1K, content_type="text/plain")
        size = int(wanted)
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        response.content_length = size
        await response.prepare(request)
        left = size
        try:
            while left > 0:
                piece = chunk if left >= CHUNK else chunk[:left]
                await response.write(piece)  # waits for the socket to drain: bounded memory
                left -= len(piece)
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    asyncio.run(_serve_forever(app))


def role_minimal(upstream: str) -> None:
    """The floor: one aiohttp server, one ClientSession, stream the body back."""
    import aiohttp
    from aiohttp import web
    from yarl import URL

    drop = {"host", "connection", "keep-alive", "content-length", "transfer-encoding"}
    state: dict[str, aiohttp.ClientSession] = {}

    async def on_startup(_app: web.Application) -> None:
        state["session"] = aiohttp.ClientSession(
            auto_decompress=False,
            connector=aiohttp.TCPConnector(limit=0),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60),
        )

    async def on_cleanup(_app: web.Application) -> None:
        await state["session"].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        url = URL(upstream + request.raw_path, encoded=True)
        data = request.content if request.body_exists else None
        try:
            upstream_response = await state["session"].request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError):
            return web.Response(status=502, text="upstream failed")
        response = web.StreamResponse(status=upstream_response.status)
        try:
            if "Content-Type" in upstream_response.headers:
                response.headers["Content-Type"] = upstream_response.headers["Content-Type"]
            if upstream_response.content_length is not None:
                response.content_length = upstream_response.content_length
            await response.prepare(request)
            async for piece in upstream_response.content.iter_chunked(CHUNK):
                await response.write(piece)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientError, TimeoutError):
            # The client left (or the upstream broke) mid-body: drop the connection quietly.
            if request.transport is not None:
                request.transport.close()
        finally:
            upstream_response.release()
        return response

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", handle)
    asyncio.run(_serve_forever(app))


def role_loadgen(url: str, connections: int, duration: float) -> None:
    """Fallback load generator: keep-alive HTTP/1.1 over asyncio streams, one process."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "status": 0}
    total_bytes = 0

    async def worker(deadline: float) -> None:
        nonlocal total_bytes
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            errors["connect"] += 1
            return
        clock = time.perf_counter
        try:
            while clock() < deadline:
                started = clock()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if match is None:
                    errors["read"] += 1
                    return
                body = await reader.readexactly(int(match.group(1)))
                latencies.append(clock() - started)
                total_bytes += len(head) + len(body)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    errors["status"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            errors["read"] += 1
        finally:
            writer.close()

    async def main() -> float:
        started = time.perf_counter()
        deadline = started + duration
        await asyncio.gather(*(worker(deadline) for _ in range(connections)))
        return time.perf_counter() - started

    elapsed = asyncio.run(main())
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, math.ceil(p / 100 * len(latencies)) - 1)] * 1e6

    print(
        "LOADJSON "
        + json.dumps(
            {
                "requests": len(latencies),
                "duration_us": elapsed * 1e6,
                "bytes": total_bytes,
                "p50_us": pct(50),
                "p90_us": pct(90),
                "p99_us": pct(99),
                "mean_us": statistics.fmean(latencies) * 1e6 if latencies else 0.0,
                "max_us": latencies[-1] * 1e6 if latencies else 0.0,
                **{f"err_{k}": v for k, v in errors.items()},
            }
        ),
        flush=True,
    )


# --------------------------------------------------------------------------------------
# The Sluice config: 20 rules, the allow that matches the benchmark request is last.
# --------------------------------------------------------------------------------------


def sluice_config(upstream: str) -> str:
    return f"""\
# Generated by tests/benchmarks/bench_proxy.py: 20 rules, the matching allow is last.
[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "state"
drain_timeout = "2s"

[identity]
mode = "none"

[limits]
max_connections = 1024

[[targets]]
name = "repo"
upstream = "{upstream}"

[[targets]]
name = "build"
upstream = "{upstream}"

[[rules]]   # 1
name = "credential-files"
path = ["**/.env", "**/.env.*", "**/*.pem", "**/*.key", "**/id_rsa*", "**/.ssh/**", "**/.aws/**"]
action = "deny"
reason = "credential files are not for agents"

[[rules]]   # 2
name = "vcs-and-package-credentials"
path = ["**/.git/**", "**/.git-credentials", "**/.netrc", "**/.npmrc", "**/.pypirc"]
action = "deny"
reason = "VCS internals and package registry credentials"

[[rules]]   # 3
name = "keystores"
path = ["**/*.p12", "**/*.pfx", "**/*.jks", "**/*.keystore", "**/*.kdbx"]
action = "deny"
reason = "key stores"

[[rules]]   # 4
name = "secret-dirs"
path = [
    "**/secrets/**", "**/.kube/**", "**/.docker/config.json", "**/.gnupg/**", "**/.terraform/**",
]
action = "deny"
reason = "secret directories"

[[rules]]   # 5
name = "no-deletes"
method = "DELETE"
action = "deny"
reason = "agents never delete"

[[rules]]   # 6
name = "no-force-push"
target = "repo"
method = "POST"
path = "/api/push"
query = {{ force = ["true", "1", "yes"] }}
action = "deny"
reason = "force pushes rewrite history"

[[rules]]   # 7
name = "push-to-main"
target = "repo"
method = "POST"
path = "/api/push"
body = '"branch"\\s*:\\s*"(main|master)"'
action = "deny"
reason = "pushes to main need a human review"

[[rules]]   # 8
name = "admin-area"
path = ["/admin/**", "/api/admin/**", "/api/settings/**"]
action = "deny"
reason = "administration is for humans"

[[rules]]   # 9
name = "no-webhooks"
target = "repo"
method = ["POST", "PUT", "PATCH"]
path = "/api/hooks/**"
action = "deny"
reason = "webhooks can exfiltrate"

[[rules]]   # 10
name = "debug-override-header"
header.x-debug-override = "*"
action = "deny"
reason = "debug overrides bypass upstream checks"

[[rules]]   # 11
name = "old-api-version"
header.x-api-version = ["1", "1.*"]
action = "deny"
reason = "API v1 is retired"

[[rules]]   # 12
name = "token-in-query"
query = ["*access_token=*", "*private_token=*", "*api_key=*"]
action = "deny"
reason = "credentials in URLs end up in logs"

[[rules]]   # 13
name = "internal-hosts"
host = ["*.internal", "*.corp", "metadata.google.internal"]
action = "deny"
reason = "internal host names are off limits"

[[rules]]   # 14
name = "form-posts"
method = "POST"
content_type = "application/x-www-form-urlencoded"
action = "deny"
reason = "agents speak JSON"

[[rules]]   # 15
name = "build-trigger"
target = "build"
method = "POST"
path = "/api/builds"
action = "allow"
reason = "agents may start builds"

[[rules]]   # 16
name = "build-read"
target = "build"
method = "GET"
path = "/api/builds/**"
action = "allow"
reason = "build status and logs are readable"

[[rules]]   # 17
name = "push-agent-branches"
target = "repo"
method = "POST"
path = "/api/push"
body = '"branch"\\s*:\\s*"agent/[A-Za-z0-9._/-]+"'
action = "allow"
reason = "agents may push to their own agent/* branches"

[[rules]]   # 18
name = "issues-write"
target = "repo"
method = "POST"
path = "/api/issues/**"
action = "allow"
reason = "agents may comment on issues"

[[rules]]   # 19
name = "pulls-read"
target = "repo"
method = "GET"
path = "/api/pulls/**"
action = "allow"
reason = "pull requests are readable"

[[rules]]   # 20: the only rule the benchmark request matches
name = "repo-read"
target = "repo"
method = ["GET", "HEAD"]
path = "/api/**"
query = {{ ref = "*" }}
action = "allow"
reason = "reading code is the agent's job"
"""


# --------------------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str = ""


class Children:
    """Every process we start; ``stop_all`` terminates, then kills what lingers."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.items: list[Child] = []

    def start(self, name: str, argv: list[str], ready: re.Pattern[str], timeout: float) -> Child:
        log = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=env,
            )
        child = Child(name, proc, log)
        self.items.append(child)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if match := ready.search(text):
                child.url = match.group(1)
                return child
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not start (exit {proc.poll()}); its output:\n{_tail(log)}")

    def check_alive(self) -> None:
        for child in self.items:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{_tail(child.log)}"
                )

    def stop_all(self) -> None:
        for child in self.items:
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
        deadline = time.monotonic() + 5
        for child in self.items:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
                child.proc.wait(5)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (clock ticks, usually 10 ms resolution)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU time spent in processes since boot (user, nice, system) plus time stolen by the
    hypervisor. Interrupt time is left out: loopback traffic is largely softirq work done on
    behalf of our own processes but charged to none of them."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = sum(values[:3]) + values[7]
    return busy / os.sysconf("SC_CLK_TCK")


class CpuLedger:
    """Splits the machine's busy CPU over an interval into ours and everybody else's.

    Ours: the servers we started, finished load-generator children, this process. What is
    left is other work on the machine competing with the benchmark (noise).
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float, float]:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = sum(cpu_seconds(pid) for pid in self.pids)
        mine = time.process_time() + children.ru_utime + children.ru_stime
        return time.perf_counter(), system_busy_seconds(), ours, mine

    def other_cpu_pct(self) -> float:
        """Other processes' CPU since ``start`` as a % of one core (can dip below 0 by a tick)."""
        end = self._snapshot()
        wall, busy, ours, mine = (b - a for a, b in zip(self.start, end, strict=True))
        return round(max(0.0, busy - ours - mine) / wall * 100) if wall > 0 else 0.0


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_bytes(self.pid))
                self.samples += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()
        with contextlib.suppress(OSError, RuntimeError):
            self.peak = max(self.peak, rss_bytes(self.pid))


# --------------------------------------------------------------------------------------
# Load generation
# --------------------------------------------------------------------------------------

WRK_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADJSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,"p50_us":%.1f,' ..
    '"p90_us":%.1f,"p99_us":%.1f,"mean_us":%.1f,"max_us":%.1f,"err_connect":%.0f,' ..
    '"err_read":%.0f,"err_write":%.0f,"err_status":%.0f,"err_timeout":%.0f}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.mean, latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def ensure_wrk(mode: str) -> str | None:
    """Path to wrk, installing it with apt-get if missing and allowed; None means fallback."""
    if mode == "python":
        return None
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get (one time)...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "wrk"],
        ):
            try:
                done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"  {' '.join(argv)} failed: {exc}", flush=True)
                break
            if done.returncode != 0:
                print(f"  {' '.join(argv)} exited {done.returncode}", flush=True)
                print("  " + done.stderr.decode(errors="replace")[-500:], flush=True)
                break
        found = shutil.which("wrk")
    if found is None and mode == "wrk":
        raise RuntimeError("wrk is required (--loadgen wrk) but could not be installed")
    if found is None:
        print("wrk unavailable: falling back to the Python load generator", flush=True)
    return found


@dataclass
class LoadResult:
    case: str
    concurrency: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    errors: dict[str, int]
    cpu_us_per_req: float | None = None
    cpu_util_pct: float | None = None
    cpu_process: str = ""
    other_cpu_pct: float | None = None


def run_load(
    wrk: str | None, workdir: Path, url: str, concurrency: int, duration: float
) -> dict[str, Any]:
    if wrk is not None:
        script = workdir / "report.lua"
        if not script.exists():
            script.write_text(WRK_LUA)
        threads = 1 if concurrency == 1 else min(2, concurrency)
        argv = [
            wrk,
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration))}s",
            "--latency",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
        ]
    else:
        argv = [
            sys.executable,
            __file__,
            "--role",
            "loadgen",
            url,
            str(concurrency),
            str(duration),
        ]
    done = subprocess.run(argv, capture_output=True, timeout=duration + 60, cwd=REPO_ROOT)
    out = done.stdout.decode(errors="replace")
    match = re.search(r"LOADJSON (\{.*\})", out)
    if done.returncode != 0 or match is None:
        raise RuntimeError(
            f"load generator failed (exit {done.returncode}):\n{out}\n"
            f"{done.stderr.decode(errors='replace')}"
        )
    return json.loads(match.group(1))


def measure(
    wrk: str | None,
    workdir: Path,
    case: str,
    url: str,
    concurrency: int,
    duration: float,
    warmup: float,
    cpu_pid: int,
    cpu_process: str,
    all_pids: list[int],
) -> LoadResult:
    if warmup > 0:
        run_load(wrk, workdir, url, concurrency, warmup)
    ledger = CpuLedger(all_pids)
    cpu_before, wall_before = cpu_seconds(cpu_pid), time.perf_counter()
    raw = run_load(wrk, workdir, url, concurrency, duration)
    other = ledger.other_cpu_pct()
    cpu_used = cpu_seconds(cpu_pid) - cpu_before
    wall = time.perf_counter() - wall_before
    seconds = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    errors = {k[4:]: int(v) for k, v in raw.items() if k.startswith("err_") and v}
    return LoadResult(
        case=case,
        concurrency=concurrency,
        requests=requests,
        seconds=round(seconds, 3),
        rps=round(requests / seconds, 1) if seconds else 0.0,
        p50_ms=round(raw["p50_us"] / 1000, 3),
        p90_ms=round(raw["p90_us"] / 1000, 3),
        p99_ms=round(raw["p99_us"] / 1000, 3),
        mean_ms=round(raw["mean_us"] / 1000, 3),
        max_ms=round(raw["max_us"] / 1000, 3),
        errors=errors,
        cpu_us_per_req=round(cpu_used / requests * 1e6, 1) if requests else None,
        cpu_util_pct=round(cpu_used / wall * 100) if wall else None,
        cpu_process=cpu_process,
        other_cpu_pct=other,
    )


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


@dataclass
class StreamResult:
    case: str
    bytes: int
    seconds: float
    mb_per_s: float
    rss_process: str
    rss_baseline_mib: float
    rss_peak_mib: float
    rss_growth_mib: float
    rss_samples: int
    other_cpu_pct: float | None = None


async def _download(url: str, expected: int) -> tuple[int, float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        started = time.perf_counter()
        async with session.get(url) as response:
            if response.status != 200:
                detail = (await response.content.read(500)).decode(errors="replace")
                raise RuntimeError(f"GET {url} answered {response.status}: {detail}")
            received = 0
            async for chunk in response.content.iter_any():
                received += len(chunk)
        elapsed = time.perf_counter() - started
    if received != expected:
        raise RuntimeError(f"GET {url}: received {received} bytes, expected {expected}")
    return received, elapsed


def measure_stream(
    case: str, url: str, size: int, pid: int, process: str, all_pids: list[int]
) -> StreamResult:
    time.sleep(0.3)  # let the process settle after the previous case
    baseline = rss_bytes(pid)
    sampler = RssSampler(pid)
    ledger = CpuLedger(all_pids)
    sampler.start()
    try:
        received, elapsed = asyncio.run(_download(url, size))
    finally:
        sampler.stop()
    other = ledger.other_cpu_pct()
    peak = max(sampler.peak, baseline)
    return StreamResult(
        case=case,
        bytes=received,
        seconds=round(elapsed, 3),
        mb_per_s=round(received / elapsed / 1e6, 1),
        rss_process=process,
        rss_baseline_mib=round(baseline / MIB, 1),
        rss_peak_mib=round(peak / MIB, 1),
        rss_growth_mib=round((peak - baseline) / MIB, 1),
        rss_samples=sampler.samples,
        other_cpu_pct=other,
    )


# --------------------------------------------------------------------------------------
# Checks, profile, report
# --------------------------------------------------------------------------------------


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def sanity_checks(urls: dict[str, str], sluice: Child, state_dir: Path) -> list[str]:
    """Each case answers 200 with the same 1 KiB body; Sluice denies and allows as designed."""
    notes = []
    for case, url in urls.items():
        status, _headers, body = http_get(url)
        if status != 200 or body != BODY_1K:
            raise RuntimeError(f"{case}: GET {url} gave {status} and {len(body)} bytes")
    status, _headers, body = http_get(f"{sluice.url}/{TARGET}/config/.env")
    if status != 403 or json.loads(body).get("rule") != "credential-files":
        raise RuntimeError(f"sluice did not deny /.env as expected: {status} {body[:200]!r}")
    status, headers, _body = http_get(urls["sluice"])
    request_id = headers.get("X-Sluice-Request-Id")
    try:
        token = (state_dir / "admin.token").read_text().strip()
        admin = re.search(r"admin API on (http://\S+)", sluice.log.read_text()).group(1)  # type: ignore[union-attr]
        _s, _h, flows_body = http_get(
            f"{admin}/api/flows?limit=10", {"Authorization": f"Bearer {token}"}
        )
        flows = {f.get("request_id"): f for f in json.loads(flows_body)["flows"]}
        rule = flows.get(request_id, {}).get("rule")
        notes.append(f"sluice allowed the benchmark request by rule {rule!r} (rule 20 of 20)")
        if rule != "repo-read":
            raise RuntimeError(f"benchmark request matched rule {rule!r}, not the last one")
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        notes.append(f"could not confirm the matching rule through the admin API: {exc}")
    return notes


def profile_sluice(
    wrk: str | None, workdir: Path, url: str, pid: int, duration: float, output: Path
) -> str:
    """An extra, unreported c=32 run with py-spy attached (sampling perturbs the numbers)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return "py-spy not found (pip install py-spy into the venv): no profile"
    fmt = {".txt": "raw", ".json": "speedscope"}.get(output.suffix, "flamegraph")
    argv = [
        py_spy,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "200",
        "--duration",
        str(max(1, round(duration))),
        "--format",
        fmt,
        "--output",
        str(output),
    ]
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        run_load(wrk, workdir, url, 32, duration)
        spy.wait(timeout=duration + 30)
    finally:
        if spy.poll() is None:
            spy.terminate()
            spy.wait(5)
    return f"py-spy profile of sluice at c=32 written to {output}"


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    revision = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        revision = f"{head}{' + uncommitted changes' if dirty else ''}" if head else revision
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "revision": revision,
    }


def wrk_version(wrk: str | None) -> str:
    if wrk is None:
        return "python asyncio fallback (one process; saturates before wrk would)"
    done = subprocess.run([wrk, "-v"], capture_output=True, timeout=10)
    text = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    return text[0].split(" Copyright")[0].strip() if text else "wrk"


def _shown(path: str) -> str:
    """A path relative to the repository when it is inside it (``.venv/bin/python``)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).absolute().relative_to(REPO_ROOT))
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    results: list[LoadResult], streams: list[StreamResult], loadgen: str, machine: dict[str, Any]
) -> dict[str, Any]:
    print()
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, "
        f"aiohttp {machine['aiohttp']}; sluice at {machine['revision']}"
    )
    print(f"load generator: {loadgen}")
    print()
    header = (
        f"{'case':<9} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/req':>11} {'CPU %':>6}  {'(process)':<9} {'other %':>7}  errors"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        cpu = f"{r.cpu_us_per_req:.0f}" if r.cpu_us_per_req is not None else "-"
        util = f"{r.cpu_util_pct:.0f}" if r.cpu_util_pct is not None else "-"
        errors = ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "0"
        other = f"{r.other_cpu_pct:.0f}" if r.other_cpu_pct is not None else "-"
        print(
            f"{r.case:<9} {r.concurrency:>4} {r.rps:>9.0f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} "
            f"{cpu:>11} {util:>6}  {r.cpu_process:<9} {other:>7}  {errors}"
        )
    print(
        "CPU us/req and CPU % are the serving process's (the upstream for direct); other % is "
        "CPU used by\nprocesses outside the benchmark during the case, in % of one core."
    )
    noisy = [r for r in results if (r.other_cpu_pct or 0) > NOISE_PCT]
    if noisy:
        print(
            f"WARNING: other processes used more than {NOISE_PCT}% of a core during "
            f"{len(noisy)} case(s): the machine was not quiet, the numbers are noisy."
        )
    print()
    if streams:
        header = (
            f"{'stream':<9} {'GiB':>5} {'MB/s':>8} {'RSS before':>11} {'RSS peak':>9} "
            f"{'growth':>8} {'other %':>8}  (process; RSS in MiB)"
        )
        print(header)
        print("-" * len(header))
        for s in streams:
            print(
                f"{s.case:<9} {s.bytes / GIB:>5.2f} {s.mb_per_s:>8.0f} "
                f"{s.rss_baseline_mib:>11.1f} {s.rss_peak_mib:>9.1f} {s.rss_growth_mib:>8.1f} "
                f"{s.other_cpu_pct or 0:>8.0f}  {s.rss_process}"
            )
        print()

    by = {(r.case, r.concurrency): r for r in results}
    ratios: dict[str, Any] = {}
    for conc in sorted({r.concurrency for r in results}):
        sluice, minimal, direct = (
            by.get(("sluice", conc)),
            by.get(("minimal", conc)),
            by.get(("direct", conc)),
        )
        if sluice and minimal and minimal.rps:
            ratio = sluice.rps / minimal.rps
            ratios[f"sluice_over_minimal_rps_c{conc}"] = {
                "value": round(ratio, 3),
                "target": f">= {RATIO_TARGET}",
                "verdict": verdict(ratio >= RATIO_TARGET),
            }
            print(
                f"sluice/minimal req/s at c={conc:<2}: {ratio:5.2f}  (target >= {RATIO_TARGET})"
                f"  {verdict(ratio >= RATIO_TARGET)}"
            )
        if minimal and direct and direct.rps:
            ratios[f"minimal_over_direct_rps_c{conc}"] = round(minimal.rps / direct.rps, 3)
            print(f"  (context) minimal/direct req/s at c={conc}: {minimal.rps / direct.rps:.2f}")
        if sluice and minimal and direct and conc == 1:
            added = sluice.p50_ms - direct.p50_ms
            floor = minimal.p50_ms - direct.p50_ms
            ratios["sluice_added_p50_ms_c1"] = round(added, 3)
            ratios["minimal_added_p50_ms_c1"] = round(floor, 3)
            print(
                f"  (context) p50 latency added at c=1: sluice {added:.3f} ms, "
                f"minimal {floor:.3f} ms"
            )
    sluice_stream = next((s for s in streams if s.case == "sluice"), None)
    if sluice_stream is not None:
        ok = sluice_stream.rss_growth_mib < RSS_TARGET_MIB
        ratios["sluice_rss_growth_1gib_mib"] = {
            "value": sluice_stream.rss_growth_mib,
            "target": f"< {RSS_TARGET_MIB:.0f}",
            "verdict": verdict(ok),
        }
        print(
            f"sluice RSS growth streaming {sluice_stream.bytes / GIB:.2f} GiB: "
            f"{sluice_stream.rss_growth_mib:.1f} MiB  (target < {RSS_TARGET_MIB:.0f} MiB)  "
            f"{verdict(ok)}"
        )
    minimal_stream = next((s for s in streams if s.case == "minimal"), None)
    if sluice_stream and minimal_stream and minimal_stream.mb_per_s:
        ratios["sluice_over_minimal_stream_mbps"] = round(
            sluice_stream.mb_per_s / minimal_stream.mb_per_s, 3
        )
        print(
            f"  (context) sluice/minimal streaming MB/s: "
            f"{sluice_stream.mb_per_s / minimal_stream.mb_per_s:.2f}"
        )
    return ratios


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~3 s per case instead of ~9 s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--duration", type=float, help="seconds per measured case")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each case")
    parser.add_argument(
        "--stream-mib",
        type=int,
        default=1024,
        help="size of the streamed body in MiB (default 1024)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk, installing it if missing, else the Python fallback",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="after measuring, record sluice at c=32 with py-spy into FILE "
        "(.svg flamegraph, .json speedscope, .txt collapsed stacks)",
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "upstream":
        role_upstream()
        return 0
    if args.role == "minimal":
        role_minimal(args.role_args[0])
        return 0
    if args.role == "loadgen":
        role_loadgen(args.role_args[0], int(args.role_args[1]), float(args.role_args[2]))
        return 0

    duration = args.duration or (3.0 if args.quick else 9.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    stream_size = args.stream_mib * MIB

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    children = Children(workdir)
    started = time.monotonic()
    try:
        wrk = ensure_wrk(args.loadgen)
        loadgen = wrk_version(wrk)
        machine = machine_info()
        ready = re.compile(r"READY (\d+)")
        upstream = children.start(
            "upstream", [sys.executable, __file__, "--role", "upstream"], ready, 20
        )
        upstream.url = f"http://127.0.0.1:{upstream.url}"
        minimal = children.start(
            "minimal", [sys.executable, __file__, "--role", "minimal", upstream.url], ready, 20
        )
        minimal.url = f"http://127.0.0.1:{minimal.url}"
        config = workdir / "sluice-bench.toml"
        config.write_text(sluice_config(upstream.url))
        state_dir = workdir / "state"
        sluice = children.start(
            "sluice",
            [
                sys.executable,
                "-m",
                "proxy",
                "proxy",
                "-c",
                str(config),
                "--state-dir",
                str(state_dir),
            ],
            re.compile(r"sluice proxy listening on (http://\S+)"),
            30,
        )
        # Let the banner finish (admin URL line) before the checks read it.
        deadline = time.monotonic() + 10
        while "admin API on" not in sluice.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = {"direct": upstream.proc.pid, "minimal": minimal.proc.pid, "sluice": sluice.proc.pid}
        processes = {"direct": "upstream", "minimal": "minimal", "sluice": "sluice"}
        urls = {
            "direct": upstream.url + THROUGHPUT_PATH,
            "minimal": minimal.url + THROUGHPUT_PATH,
            "sluice": f"{sluice.url}/{TARGET}{THROUGHPUT_PATH}",
        }
        print(f"load generator: {loadgen}")
        print(
            f"servers: upstream pid {upstream.proc.pid} {upstream.url}, minimal pid "
            f"{minimal.proc.pid} {minimal.url}, sluice pid {sluice.proc.pid} {sluice.url}"
        )
        for note in sanity_checks(urls, sluice, state_dir):
            print(note)
        print(
            f"throughput: {duration:g} s per case after {warmup:g} s warm-up, "
            f"GET {THROUGHPUT_PATH} (1 KiB body)",
            flush=True,
        )

        results: list[LoadResult] = []
        for conc in args.concurrency:
            for case in ("direct", "minimal", "sluice"):
                result = measure(
                    wrk,
                    workdir,
                    case,
                    urls[case],
                    conc,
                    duration,
                    warmup,
                    pids[case],
                    processes[case],
                    list(pids.values()),
                )
                children.check_alive()
                results.append(result)
                print(
                    f"  {case:<8} c={conc:<3} {result.rps:>8.0f} req/s  p50 "
                    f"{result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                    f"cpu {result.cpu_us_per_req} us/req",
                    flush=True,
                )

        streams: list[StreamResult] = []
        if stream_size > 0:
            print(f"streaming {stream_size / GIB:.2f} GiB, {CHUNK // 1024} KiB chunks", flush=True)
            path = STREAM_PATH.format(size=stream_size)
            stream_urls = {
                "direct": upstream.url + path,
                "minimal": minimal.url + path,
                "sluice": f"{sluice.url}/{TARGET}{path}",
            }
            for case in ("direct", "minimal", "sluice"):
                result = measure_stream(
                    case,
                    stream_urls[case],
                    stream_size,
                    pids[case],
                    processes[case],
                    list(pids.values()),
                )
                children.check_alive()
                streams.append(result)
                print(
                    f"  {case:<8} {result.mb_per_s:>7.0f} MB/s  RSS {result.rss_baseline_mib}"
                    f" -> peak {result.rss_peak_mib} MiB",
                    flush=True,
                )

        ratios = report(results, streams, loadgen, machine)
        profile_note = None
        if args.profile:
            profile_note = profile_sluice(
                wrk, workdir, urls["sluice"], pids["sluice"], duration, args.profile.absolute()
            )
            print(profile_note)
        elapsed = time.monotonic() - started
        print(f"\ntotal {elapsed:.0f} s")
        if args.json:
            document = {
                "command": " ".join([_shown(sys.executable), *sys.argv]),
                "machine": machine,
                "load_generator": loadgen,
                "duration_s": duration,
                "warmup_s": warmup,
                "request": f"GET {THROUGHPUT_PATH} (sluice: /{TARGET}{THROUGHPUT_PATH})",
                "sluice_rules": 20,
                "throughput": [asdict(r) for r in results],
                "streaming": [asdict(s) for s in streams],
                "ratios": ratios,
                "profile": profile_note,
                "elapsed_s": round(elapsed, 1),
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 0
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
