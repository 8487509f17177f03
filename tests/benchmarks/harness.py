"""Benchmark plumbing: shared constants, child processes, CPU and RSS accounting, HTTP GET.

Imported by name (``import harness``): ``bench_proxy.py`` puts this directory on
``sys.path`` before importing it, in the parent and in every child role.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The entry point; child roles run as ``python bench_proxy.py --role NAME ...``.
ENTRY = Path(__file__).resolve().with_name("bench_proxy.py")

CHUNK = 256 * 1024
BODY_1K = (b"package main // sluice benchmark filler line\n" * 24)[:1024]
GIB = 1 << 30
MIB = 1 << 20

#: The request every throughput case sends (relative to the server's root). Through
#: Sluice it is prefixed with the target name; the upstream sees the same path either way.
THROUGHPUT_PATH = "/api/files/src/cmd/server/main.go?ref=main"
STREAM_PATH = "/api/files/assets/blob.bin?ref=main&bytes={size}"
#: On this path the upstream answers with the request headers it received, as JSON.
#: Only the sanity checks use it; ``repo-read`` allows it like the throughput request.
ECHO_PATH = "/api/bench/echo-headers"
TARGET = "repo"

RSS_TARGET_MIB = 64.0
NOISE_PCT = 15
RATIO_TARGET = 0.8
ID_RATIO_TARGET = 0.9


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
        raise RuntimeError(f"{name} did not start (exit {proc.poll()}); its output:\n{tail(log)}")

    def check_alive(self) -> None:
        for child in self.items:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited with {child.proc.returncode}:\n{tail(child.log)}"
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


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# --------------------------------------------------------------------------------------
# CPU and RSS
# --------------------------------------------------------------------------------------


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
# One-off requests (sanity checks)
# --------------------------------------------------------------------------------------


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
