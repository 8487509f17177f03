"""Load generation (wrk, or the asyncio fallback role) and the streaming download."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import ENTRY, MIB, REPO_ROOT, CpuLedger, RssSampler, cpu_seconds, rss_bytes

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


def wrk_version(wrk: str | None) -> str:
    if wrk is None:
        return "python asyncio fallback (one process; saturates before wrk would)"
    done = subprocess.run([wrk, "-v"], capture_output=True, timeout=10)
    text = (done.stdout + done.stderr).decode(errors="replace").strip().splitlines()
    return text[0].split(" Copyright")[0].strip() if text else "wrk"


def role_loadgen(url: str, connections: int, duration: float, headers: list[str]) -> None:
    """Fallback load generator: keep-alive HTTP/1.1 over asyncio streams, one process.

    ``headers`` are extra request header lines (``"Name: value"``), as wrk's ``-H``.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{line}\r\n" for line in headers)
    request = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()
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

    summary = {
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
    print("LOADJSON " + json.dumps(summary), flush=True)


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
    wrk: str | None,
    workdir: Path,
    url: str,
    concurrency: int,
    duration: float,
    headers: list[str] | None = None,
) -> dict[str, Any]:
    headers = headers or []
    if wrk is not None:
        script = workdir / "report.lua"
        if not script.exists():
            script.write_text(WRK_LUA)
        threads = 1 if concurrency == 1 else min(2, concurrency)
        argv = [wrk, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(duration))}s"]
        for line in headers:
            argv += ["-H", line]
        argv += ["--latency", "--timeout", "10s", "-s", str(script), url]
    else:
        argv = [sys.executable, str(ENTRY), "--role", "loadgen", url, str(concurrency)]
        argv += [str(duration), *headers]
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
    headers: list[str] | None = None,
) -> LoadResult:
    if warmup > 0:
        run_load(wrk, workdir, url, concurrency, warmup, headers)
    ledger = CpuLedger(all_pids)
    cpu_before, wall_before = cpu_seconds(cpu_pid), time.perf_counter()
    raw = run_load(wrk, workdir, url, concurrency, duration, headers)
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
