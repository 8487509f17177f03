#!/usr/bin/env python3
"""Masking engine throughput: Hyperscan against the pure-Python fallback.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_masking.py [--mb 100] [--json FILE]

Builds about ``--mb`` MB of mixed text (installed ``.py`` sources, JSON API responses with
escapes and base64, env/YAML/TOML config) with a planted fake secret every ~20 KB, then
reports MB/s for each backend as whole bodies (1 MiB each) and as a stream in 64 KiB
chunks, plus how many spans were found. It prints; it never asserts on time (target for
Hyperscan: >= 400 MB/s on the 2-core reference machine).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.masking import Masker, hyperscan_available
from proxy.masking.fakes import FAKES, fake

MIB = 1024 * 1024


def code_text(limit: int) -> bytes:
    site = Path(sysconfig.get_paths()["purelib"])
    parts, total = [], 0
    for path in sorted(site.rglob("*.py")):
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= limit:
            break
    return b"".join(parts)[:limit]


def json_text(rng: random.Random, limit: int) -> bytes:
    parts, total = [], 0
    while total < limit:
        doc = {
            "id": f"msg_{rng.getrandbits(64):x}",
            "choices": [{"message": {"content": 'Line one\nline two with "quotes" ' * 8}}],
            "file": base64.b64encode(rng.randbytes(600)).decode(),
            "usage": {"prompt_tokens": rng.randrange(9999), "completion_tokens": 12},
            "url": "https:\\/\\/api.example.com\\/v1\\/items?page=2",
        }
        chunk = json.dumps(doc).encode() + b"\n"
        parts.append(chunk)
        total += len(chunk)
    return b"".join(parts)[:limit]


def config_text(rng: random.Random, limit: int) -> bytes:
    lines, total = [], 0
    while total < limit:
        n = rng.randrange(1000)
        block = (
            f'[service{n}]\nhost = "db{n}.internal"\nport = {5000 + n}\ntimeout = "30s"\n'
            f"SERVICE_{n}_URL=https://svc{n}.internal/api\nLOG_LEVEL=info\nWORKERS={n % 16}\n"
            f"feature_flags:\n  - name: flag{n}\n    enabled: true\n"
        ).encode()
        lines.append(block)
        total += len(block)
    return b"".join(lines)[:limit]


def corpus(megabytes: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    size = megabytes * MIB
    base = code_text(size // 2) + json_text(rng, size // 4) + config_text(rng, size // 4)
    while len(base) < size:
        base += base[: size - len(base)]
    rules = sorted(FAKES)
    out = bytearray()
    for start in range(0, len(base), 20_000):
        out += base[start : start + 20_000]
        out += b"\nexport X=" + fake(rng.choice(rules), rng)[0].encode() + b"\n"
    return [bytes(out[i : i + MIB]) for i in range(0, len(out), MIB)]


def measure(masker: Masker, bodies: list[bytes]) -> dict[str, float]:
    total = sum(len(b) for b in bodies)
    start = time.perf_counter()
    spans = sum(len(masker.mask_bytes(body).spans) for body in bodies)
    whole = time.perf_counter() - start
    stream = masker.stream()
    start = time.perf_counter()
    for body in bodies:
        for i in range(0, len(body), 65536):
            stream.feed(body[i : i + 65536])
    stream.finish()
    streamed = time.perf_counter() - start
    return {
        "mb": total / 1e6,
        "whole_mb_s": total / 1e6 / whole,
        "stream_mb_s": total / 1e6 / streamed,
        "spans": spans,
        "stream_spans": len(stream.spans),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MiB")
    parser.add_argument("--python-mb", type=int, default=0, help="fallback corpus (0 = same)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    bodies = corpus(args.mb)
    results = {}
    backends = ["hyperscan", "python"] if hyperscan_available() else ["python"]
    for backend in backends:
        masker = Masker(hmac_key=b"bench", backend=backend)
        sample = bodies[: args.python_mb] if backend == "python" and args.python_mb else bodies
        results[backend] = measure(masker, sample)
        r = results[backend]
        print(
            f"{backend:9s} {r['mb']:7.1f} MB  whole bodies {r['whole_mb_s']:7.1f} MB/s  "
            f"stream (64 KiB) {r['stream_mb_s']:7.1f} MB/s  spans {r['spans']}/{r['stream_spans']}",
            flush=True,
        )
    if "hyperscan" in results:
        print(f"hyperscan target >= 400 MB/s: whole {results['hyperscan']['whole_mb_s']:.0f} MB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
