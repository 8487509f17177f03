#!/usr/bin/env python3
"""Masking throughput through the proxy: a big text body streamed with masking on and off.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_masking_proxy.py [--quick] [--json FILE]

Each server runs in its own process on 127.0.0.1: an aiohttp upstream (this file,
``--role upstream``) and Sluice (``python -m proxy proxy -c CFG --state-dir DIR``) with two
targets on that upstream, ``masked`` (masking on, the default) and ``plain``
(``masking = {enabled = false}``). The upstream streams a 1 GiB body (``--quick``:
256 MiB) in 256 KiB chunks, cut from a repeated ~1 MiB block of mixed code, JSON and
config text with a few planted fakes (``proxy.masking.fakes``); the block's size is not a
multiple of the chunk, so the fakes land across chunk boundaries at shifting offsets.

The client (aiohttp, in this process) reads and discards the body, counting bytes and
looking for every planted secret (whole, and the part masking hides) across chunk
boundaries: through ``plain`` they must all be there, through ``masked`` none; Sluice's own
``request.completed`` events (admin API) must count every planted secret as masked. Each
target is streamed ``--rounds`` times (default 3, alternating); the report gives the
median MB/s of both, their ratio (target: masked >= 0.5 x plain) and the growth of the
Sluice process's RSS while masking (VmRSS sampled every 50 ms; target < 64 MiB). Missing a
target prints MISS: it is a result, not a failure. The exit status is 0 unless something
crashed, or 1 when a planted secret came through the masked target.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helpers are imported by name, also in the child role
    sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402
    CHUNK,
    GIB,
    MIB,
    Children,
    CpuLedger,
    RssSampler,
    cpu_seconds,
    rss_bytes,
)

RATIO_TARGET = 0.5
RSS_TARGET_MIB = 64.0
BLOCK_TARGET = MIB
#: Planted in the block, spread out: (rule id, seed). Their contexts avoid the generic
#: NAME=value rule, so each is reported under its own rule.
PLANTED = [
    ("github-pat", 1),
    ("aws-access-key-id", 2),
    ("slack-bot-token", 3),
    ("stripe-secret-key", 4),
    ("openai-api-key", 5),
    ("gitlab-pat", 6),
    ("npm-token", 7),
    ("google-api-key", 8),
    ("pem-private-key", 9),
]
STREAM_PATH = "/stream?bytes={size}"
WARMUP = 16 * MIB


# --------------------------------------------------------------------------------------
# The body
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    data: bytes
    secrets: list[bytes]  # the secret part of every planted fake (what a span covers)

    @property
    def needles(self) -> list[bytes]:
        """What must never come out of the masked target: each secret whole, its last 16
        bytes (always in the hidden part), and for a PEM block each full base64 line."""
        found: set[bytes] = set()
        for secret in self.secrets:
            found.update({secret, secret[-16:]})
            found.update(line for line in secret.split(b"\n") if len(line) >= 40)
        return sorted(found)


def build_block(seed: int = 7) -> Block:
    """~1 MiB of code, JSON and config text (the same generators as ``bench_masking.py``)
    with the ``PLANTED`` fakes spread through it."""
    from bench_masking import code_text, config_text, json_text

    from proxy.masking.fakes import fake

    rng = random.Random(seed)
    base = (
        code_text(BLOCK_TARGET // 2)
        + json_text(rng, BLOCK_TARGET // 4)
        + config_text(rng, BLOCK_TARGET // 4)
    )
    step = len(base) // (len(PLANTED) + 1)
    out, secrets = bytearray(), []
    for index, (rule, fake_seed) in enumerate(PLANTED):
        text, secret = fake(rule, random.Random(fake_seed))
        out += base[index * step : (index + 1) * step]
        out += f"\n# credentials the agent must not see: {text}\n".encode()
        secrets.append(secret.encode())
    out += base[len(PLANTED) * step :]
    if len(out) % CHUNK == 0:
        out += b"\n"
    return Block(bytes(out), secrets)


# --------------------------------------------------------------------------------------
# The upstream role
# --------------------------------------------------------------------------------------


def role_upstream(block_file: str) -> None:
    """``GET /stream?bytes=N``: N bytes of the repeated block, text/plain, Content-Length,
    written 256 KiB at a time (each write waits for the socket: bounded memory)."""
    from aiohttp import web
    from servers import _serve_forever

    block = Path(block_file).read_bytes()
    ring = memoryview(block + block[:CHUNK])

    async def handle(request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("bytes", len(block)))
        response = web.StreamResponse()
        response.content_type = "text/plain"
        response.charset = "utf-8"
        response.content_length = size
        await response.prepare(request)
        offset = 0
        try:
            while offset < size:
                start = offset % len(block)
                piece = ring[start : start + min(CHUNK, size - offset)]
                await response.write(piece)
                offset += len(piece)
            await response.write_eof()
        except ConnectionError:
            pass
        return response

    app = web.Application()
    app.router.add_get("/stream", handle)
    asyncio.run(_serve_forever(app))


# --------------------------------------------------------------------------------------
# The client: count bytes, look for the planted secrets across chunk boundaries
# --------------------------------------------------------------------------------------


class SecretWatch:
    """Counts occurrences of the needles in a stream, also across chunk boundaries.

    Hyperscan (stream mode, several GB/s) when it imports, else ``bytes.find`` over the
    previous chunk's tail plus the chunk.
    """

    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        self.hits = 0
        self.backend = "bytes.find"
        self._tail = b""
        self._keep = max(len(n) for n in needles) - 1
        self._stream: Any = None
        try:
            import hyperscan
        except ImportError:
            return
        self.backend = "hyperscan"
        db = hyperscan.Database(mode=hyperscan.HS_MODE_STREAM)
        patterns = ["".join(f"\\x{b:02x}" for b in needle).encode() for needle in needles]
        db.compile(
            expressions=patterns,
            ids=list(range(len(patterns))),
            elements=len(patterns),
            flags=[0] * len(patterns),
        )
        # Live references: hyperscan's stream borrows both the database and the callback.
        self._db = db
        self._on_match = self._count
        self._stream = db.stream(match_event_handler=self._on_match)
        self._stream.__enter__()

    @staticmethod
    def available_backend() -> str:
        try:
            import hyperscan  # noqa: F401
        except ImportError:
            return "bytes.find"
        return "hyperscan"

    def _count(self, *_args: Any) -> None:
        self.hits += 1

    def feed(self, chunk: bytes) -> None:
        if self._stream is not None:
            self._stream.scan(chunk)
            return
        window = self._tail + chunk
        skip = len(self._tail)  # matches wholly inside the tail were counted already
        for needle in self.needles:
            at = window.find(needle, max(0, skip - len(needle) + 1))
            while at >= 0:
                self.hits += 1
                at = window.find(needle, at + 1)
        self._tail = window[-self._keep :]

    def close(self) -> None:
        if self._stream is not None:
            self._stream.__exit__(None, None, None)
            self._stream = None


@dataclass
class Transfer:
    target: str
    bytes: int
    seconds: float
    mb_per_s: float
    secret_hits: int
    rss_before_mib: float
    rss_peak_mib: float
    rss_growth_mib: float
    rss_samples: int
    sluice_cpu_s: float
    other_cpu_pct: float  # CPU of processes that are not ours, % of one core: noise


async def _download(url: str, expected: int, watch: SecretWatch) -> tuple[int, float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=900, sock_read=60)
    async with aiohttp.ClientSession(
        timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        started = time.perf_counter()
        async with session.get(url) as response:
            if response.status != 200:
                detail = (await response.content.read(500)).decode(errors="replace")
                raise RuntimeError(f"GET {url} answered {response.status}: {detail}")
            received = 0
            async for chunk in response.content.iter_any():
                received += len(chunk)
                watch.feed(chunk)
        elapsed = time.perf_counter() - started
    if received != expected:
        raise RuntimeError(f"GET {url}: received {received} bytes, expected {expected}")
    return received, elapsed


def transfer(
    target: str, url: str, size: int, pid: int, needles: list[bytes], pids: list[int]
) -> Transfer:
    time.sleep(0.3)  # let the process settle after the previous transfer
    before = rss_bytes(pid)
    cpu_before = cpu_seconds(pid)
    sampler = RssSampler(pid, 0.05)
    watch = SecretWatch(needles)
    ledger = CpuLedger(pids)
    sampler.start()
    try:
        received, elapsed = asyncio.run(_download(url, size, watch))
    finally:
        sampler.stop()
        watch.close()
    peak = max(sampler.peak, before)
    return Transfer(
        target=target,
        bytes=received,
        seconds=round(elapsed, 3),
        mb_per_s=round(received / elapsed / 1e6, 1),
        secret_hits=watch.hits,
        rss_before_mib=round(before / MIB, 1),
        rss_peak_mib=round(peak / MIB, 1),
        rss_growth_mib=round((peak - before) / MIB, 1),
        rss_samples=sampler.samples,
        sluice_cpu_s=round(cpu_seconds(pid) - cpu_before, 2),
        other_cpu_pct=ledger.other_cpu_pct(),
    )


# --------------------------------------------------------------------------------------
# Sluice
# --------------------------------------------------------------------------------------


def sluice_config(upstream: str) -> str:
    return f"""\
# Generated by tests/benchmarks/bench_masking_proxy.py
[proxy]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
state_dir = "state"
drain_timeout = "2s"

[[targets]]
name = "masked"
upstream = "{upstream}"

[[targets]]
name = "plain"
upstream = "{upstream}"
masking = {{ enabled = false }}

[[rules]]
name = "allow-all"
action = "allow"
"""


def start_sluice(children: Children, config: Path, state_dir: Path) -> tuple[Any, str]:
    """The Sluice child and its admin URL."""
    argv = [sys.executable, "-m", "proxy", "proxy", "-c", str(config)]
    argv += ["--state-dir", str(state_dir)]
    ready = re.compile(r"sluice proxy listening on (http://\S+)")
    child = children.start("sluice", argv, ready, 30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if found := re.search(r"admin API on (http://\S+)", child.log.read_text()):
            return child, found.group(1)
        time.sleep(0.05)
    raise RuntimeError("sluice did not print its admin URL")


async def _completed_events(admin_url: str, token: str) -> list[dict[str, Any]]:
    """Every ``request.completed`` event the proxy still holds (admin SSE replay)."""
    import aiohttp

    found = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
        session.get(
            f"{admin_url}/api/events?since=0", headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"admin events answered {response.status}")
        kind = ""
        async for line in response.content:
            text = line.decode().rstrip("\n")
            if text.startswith("event: "):
                kind = text[7:]
                if kind == "stream.ready":
                    break
            elif text.startswith("data: ") and kind == "request.completed":
                found.append(json.loads(text[6:]))
    return found


def masked_spans(admin_url: str, token: str, size: int) -> tuple[list[int], str]:
    """Spans Sluice reports for each masked response of ``size`` bytes, and what the last
    event shows."""
    events = asyncio.run(_completed_events(admin_url, token))
    masked = [event for event in events if "masked" in event and event["bytes_out"] == size]
    if not masked:
        raise RuntimeError("no request.completed event with mask spans")
    last = masked[-1]
    rules = sorted({span["rule"] for span in last["mask_spans"]})
    listed = f"{len(last['mask_spans'])} spans listed per event (rules {', '.join(rules)})"
    return [event["masked"] for event in masked], f"{listed}; event {len(json.dumps(last))} bytes"


def planted_occurrences(block: Block, size: int) -> int:
    """How many whole planted secrets a body of ``size`` bytes of the repeated block holds."""
    count = 0
    for secret in block.secrets:
        offset = block.data.index(secret)
        while offset + len(secret) <= size:
            count += 1
            offset += len(block.data)
    return count


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--mib", type=int, help="body size in MiB (overrides --quick)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="transfers per target, alternating; the median counts (default 3)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "upstream":
        role_upstream(args.role_args[0])
        return 0
    if args.role:
        raise SystemExit(f"unknown role {args.role!r}")
    size = (args.mib or (256 if args.quick else 1024)) * MIB

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-masking-"))
    children = Children(workdir)
    started = time.monotonic()
    try:
        from report import machine_info

        from proxy.masking import hyperscan_available

        machine = machine_info()
        block = build_block()
        block_file = workdir / "block.txt"
        block_file.write_bytes(block.data)
        needles = block.needles

        upstream = children.start(
            "upstream",
            [sys.executable, str(Path(__file__).resolve()), "--role", "upstream", str(block_file)],
            re.compile(r"READY (\d+)"),
            20,
        )
        upstream.url = f"http://127.0.0.1:{upstream.url}"
        config = workdir / "sluice-masking.toml"
        config.write_text(sluice_config(upstream.url))
        sluice, admin_url = start_sluice(children, config, workdir / "state")
        admin_token = (workdir / "state" / "admin.token").read_text().strip()
        pid = sluice.proc.pid
        pids = [upstream.proc.pid, pid]
        urls = {
            name: f"{sluice.url}/{name}{STREAM_PATH.format(size=size)}"
            for name in ("plain", "masked")
        }
        print(
            f"machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, "
            f"aiohttp {machine['aiohttp']}; sluice at {machine['revision']}"
        )
        print(
            f"masking backend: {'hyperscan' if hyperscan_available() else 'python'}; "
            f"block {len(block.data)} bytes with {len(block.secrets)} planted fakes "
            f"({', '.join(rule for rule, _ in PLANTED)}); {len(needles)} needles; "
            f"leak check: {SecretWatch.available_backend()}"
        )
        print(f"servers: upstream pid {upstream.proc.pid}, sluice pid {pid} {sluice.url}")

        # Warm-up, and the check that the needles mean something: through ``plain`` every
        # planted secret is there, through ``masked`` none.
        warm = {
            name: transfer(
                name,
                f"{sluice.url}/{name}{STREAM_PATH.format(size=WARMUP)}",
                WARMUP,
                pid,
                needles,
                pids,
            )
            for name in ("plain", "masked")
        }
        children.check_alive()
        if warm["plain"].secret_hits == 0:
            raise RuntimeError("the planted secrets do not show through the unmasked target")
        if warm["masked"].secret_hits:
            raise RuntimeError(f"{warm['masked'].secret_hits} secret hits through masking")
        print(
            f"warm-up {WARMUP // MIB} MiB each: plain {warm['plain'].secret_hits} secret hits, "
            f"masked {warm['masked'].secret_hits}"
        )

        print(
            f"streaming {size / GIB:.2f} GiB per target, {CHUNK // 1024} KiB chunks, "
            f"{args.rounds} rounds (plain, masked, plain, ...)",
            flush=True,
        )
        baseline = rss_bytes(pid)
        results: dict[str, list[Transfer]] = {"plain": [], "masked": []}
        for round_ in range(1, args.rounds + 1):
            for name in ("plain", "masked"):
                result = transfer(name, urls[name], size, pid, needles, pids)
                results[name].append(result)
                children.check_alive()
                print(
                    f"  {round_}. {name:<6} {result.mb_per_s:>7.1f} MB/s  {result.seconds:>6.2f} s"
                    f"  sluice CPU {result.sluice_cpu_s:>5.2f} s  RSS {result.rss_before_mib} ->"
                    f" peak {result.rss_peak_mib} MiB (+{result.rss_growth_mib})  secret hits "
                    f"{result.secret_hits}  other CPU {result.other_cpu_pct:.0f}%",
                    flush=True,
                )
        plain_mb_s = statistics.median(r.mb_per_s for r in results["plain"])
        masked_mb_s = statistics.median(r.mb_per_s for r in results["masked"])
        leaked = sum(r.secret_hits for r in results["masked"])
        shown = min(r.secret_hits for r in results["plain"])
        growth = max(r.rss_growth_mib for r in results["masked"])
        peak = max(r.rss_peak_mib for r in results["masked"])
        overall = round(peak - baseline / MIB, 1)
        spans, listed = masked_spans(admin_url, admin_token, size)
        planted = planted_occurrences(block, size)
        extra = f", {max(spans) - planted} more in the filler text" if max(spans) > planted else ""
        print(
            f"  sluice reports {'/'.join(map(str, spans))} masked spans per masked transfer "
            f"({planted} planted secrets in each{extra}); {listed}"
        )
        ratio = masked_mb_s / plain_mb_s if plain_mb_s else 0.0
        ratio_ok = ratio >= RATIO_TARGET
        rss_ok = growth < RSS_TARGET_MIB
        print()
        print(f"median throughput: unmasked {plain_mb_s:.1f} MB/s, masked {masked_mb_s:.1f} MB/s")
        print(
            f"masked / unmasked throughput: {ratio:.2f} (target >= {RATIO_TARGET}): "
            f"{verdict(ratio_ok)}"
        )
        print(
            f"RSS growth while masking: {growth} MiB at most in one transfer, {overall} MiB over "
            f"the value before the first measured transfer (target < {RSS_TARGET_MIB:g} MiB): "
            f"{verdict(rss_ok and overall < RSS_TARGET_MIB)}"
        )
        print(
            f"planted secrets seen through masking: {leaked} (must be 0): "
            f"{'FAIL' if leaked else 'PASS'}; through the unmasked target: {shown} or more"
        )
        if shown == 0:
            raise RuntimeError("the unmasked transfers carried no planted secret")
        elapsed = time.monotonic() - started
        print(f"\ntotal {elapsed:.0f} s")
        if args.json:
            document = {
                "command": " ".join([sys.executable, *sys.argv]),
                "machine": machine,
                "backend": "hyperscan" if hyperscan_available() else "python",
                "size_bytes": size,
                "block_bytes": len(block.data),
                "planted": [rule for rule, _ in PLANTED],
                "warmup": {name: asdict(r) for name, r in warm.items()},
                "transfers": {name: [asdict(r) for r in rs] for name, rs in results.items()},
                "median_mb_per_s": {"plain": plain_mb_s, "masked": masked_mb_s},
                "ratio": round(ratio, 3),
                "ratio_target": RATIO_TARGET,
                "ratio_ok": ratio_ok,
                "rss_growth_target_mib": RSS_TARGET_MIB,
                "rss_growth_mib": growth,
                "rss_growth_over_baseline_mib": overall,
                "rss_ok": rss_ok and overall < RSS_TARGET_MIB,
                "leaked": leaked,
                "masked_spans": spans,
                "planted_in_body": planted,
                "elapsed_s": round(elapsed, 1),
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 1 if leaked else 0
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
