#!/usr/bin/env python3
"""Session recorder throughput, and what a 1 GiB recording costs to index and open.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_recording.py [--quick] [--json FILE]

1. Append throughput through ``Recorder`` (every append durable: written and fsynced,
   group commit), for 1, 16 and 128 concurrent appenders, with the fsync count.
2. Generates a recording of 1 GiB (``--quick``: 128 MiB) of realistic records
   (requests, decisions, masked responses, checkpoints), then times: the index build
   (first open), opening with the cached index, random ``get``, ``seek_time``,
   ``sessions()``, and a full ``verify``.

Everything is written to a temporary directory that is deleted afterwards. It prints;
it never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxy.recording import Recorder, Recording, verify
from proxy.recording import format as fmt
from proxy.recording.files import file_name
from proxy.recording.keys import Signer, publish_public_key
from proxy.recording.recovery import new_chain_id

MIB = 1024 * 1024


async def append_throughput(root: Path, total: int, concurrency: int) -> dict[str, Any]:
    directory = root / f"append-{concurrency}"
    rec = Recorder(directory, root / "state" / "recording-signing.pem", checkpoint_every=1000)
    await rec.open()
    fsyncs = 0
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    os.fsync = counting  # type: ignore[assignment]
    body = b'{"ok": true, "items": [1, 2, 3], "text": "' + b"x" * 600 + b'"}'
    queue = iter(range(total))

    async def worker() -> None:
        for n in queue:
            await rec.append(
                "response",
                request_id=f"r{n}",
                session="bench",
                status=200,
                headers={"Content-Type": "application/json"},
                body=body,
                mask_spans=[],
            )

    started = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    finally:
        os.fsync = real_fsync  # type: ignore[assignment]
    await rec.close()
    size = sum(p.stat().st_size for p in directory.glob("*.jsonl"))
    return {
        "concurrency": concurrency,
        "records": total,
        "seconds": round(elapsed, 3),
        "records_per_s": round(total / elapsed),
        "mb_per_s": round(size / MIB / elapsed, 1),
        "fsyncs": fsyncs,
        "records_per_fsync": round(total / max(1, fsyncs), 1),
    }


def generate(directory: Path, target: int, seed: int = 7) -> dict[str, Any]:
    """A recording of about ``target`` bytes in one file, written the recorder's way."""
    rng = random.Random(seed)
    directory.mkdir(mode=0o700, parents=True)
    signer = Signer.generate()
    publish_public_key(directory, signer)
    now = time.time() - 86400
    path = directory / file_name(now, 1)
    chain, seq, head, since, from_seq = new_chain_id(), 0, fmt.GENESIS, 0, 1
    written, records = 0, 0
    text = "The quick brown fox jumps over the lazy dog. " * 4
    with open(path, "wb", buffering=8 * MIB) as out:

        def put(kind: str, fields: dict[str, Any]) -> None:
            nonlocal seq, head, since, from_seq, written, records, now
            seq += 1
            now += rng.random() * 0.05
            if kind == fmt.CHECKPOINT:
                record = fmt.make_checkpoint(
                    seq,
                    now,
                    head,
                    from_seq=from_seq,
                    chain=chain,
                    key_id=signer.key_id,
                    sign=signer.sign,
                )
                since, from_seq = 0, seq + 1
            else:
                record = fmt.build_record(seq, now, head, kind, fields)
                since += 1
            line = fmt.encode_record(record)
            out.write(line)
            head = fmt.line_hash(line)
            written += len(line)
            records += 1
            if since >= 1000:
                put(fmt.CHECKPOINT, {})

        put(
            fmt.FILE_START,
            {"file": path.name, "index": 1, "chain": chain, "prev_file": None, "reason": "start"},
        )
        session_no = 0
        while written < target:
            session_no += 1
            session = f"sess-{session_no:06d}"
            put(
                fmt.SESSION_START,
                {
                    "session": session,
                    "subject": f"agent-{session_no % 17}",
                    "groups": ["dev"],
                    "token_id": f"jti-{session_no}",
                },
            )
            for n in range(rng.randint(20, 80)):
                request_id = f"{session}-{n:04d}"
                headers = [
                    ["Content-Type", "application/json"],
                    ["Authorization", "[REDACTED]"],
                    ["User-Agent", "agent/1.0"],
                    ["Accept", "*/*"],
                ]
                put(
                    fmt.REQUEST,
                    {
                        "session": session,
                        "request_id": request_id,
                        "method": "POST",
                        "target": "github",
                        "url": f"https://api.github.com/repos/o/r/issues/{n}",
                        "headers": headers,
                        "body": {"text": json.dumps({"title": text[: rng.randint(10, 150)]})},
                    },
                )
                action = rng.choices(["allowed", "denied", "held"], [90, 7, 3])[0]
                put(
                    fmt.DECISION,
                    {
                        "session": session,
                        "request_id": request_id,
                        "action": action,
                        "rule": "r",
                        "reason": "policy",
                    },
                )
                if action == "denied":
                    continue
                size = rng.choice([200, 800, 2000, 4000, 8000, 30000])
                masked = rng.random() < 0.05
                put(
                    fmt.RESPONSE,
                    {
                        "session": session,
                        "request_id": request_id,
                        "status": 200,
                        "mask_spans": [
                            {
                                "start": 5,
                                "end": 45,
                                "rule": "github-pat",
                                "fingerprint": "0123456789abcdef",
                            }
                        ]
                        if masked
                        else [],
                        "headers": headers[:1],
                        "body": {"text": (text * (size // len(text) + 1))[:size]},
                    },
                )
            put(fmt.SESSION_END, {"session": session})
        put(fmt.CHECKPOINT, {})
    os.chmod(path, 0o600)
    return {"path": path, "bytes": written, "records": records, "sessions": session_no}


def time_it(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def read_benchmarks(directory: Path, generated: dict[str, Any]) -> dict[str, Any]:
    path = generated["path"]
    results: dict[str, Any] = {}
    recording, results["index_build_s"] = time_it(lambda: Recording.open(directory))
    recording.close()
    idx = path.with_name(path.name + ".idx")
    results["index_file_mb"] = round(idx.stat().st_size / MIB, 1)
    recording, results["open_cached_s"] = time_it(lambda: Recording.open(directory))
    rng = random.Random(1)
    last = recording.last_seq or 1
    picks = [rng.randint(1, last) for _ in range(2000)]
    _, elapsed = time_it(lambda: [recording.get(seq) for seq in picks])
    results["get_random_us"] = round(elapsed / len(picks) * 1e6, 1)
    first_ts, last_ts = recording.get(1)["ts"], recording.get(last)["ts"]
    stamps = [rng.uniform(first_ts, last_ts) for _ in range(2000)]
    _, elapsed = time_it(lambda: [recording.seek_time(ts) for ts in stamps])
    results["seek_time_us"] = round(elapsed / len(stamps) * 1e6, 1)
    sessions, results["sessions_s"] = time_it(recording.sessions)
    results["sessions"] = len(sessions)
    _flows, results["flows_one_session_s"] = time_it(lambda: recording.flows(sessions[-1].id))
    recording.close()
    verified, elapsed = time_it(lambda: verify([directory]))
    results["verify_s"] = round(elapsed, 2)
    results["verify_mb_per_s"] = round(generated["bytes"] / MIB / elapsed)
    results["verify_state"] = verified[0].state
    for key in ("index_build_s", "open_cached_s", "sessions_s", "flows_one_session_s"):
        results[key] = round(results[key], 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    parser.add_argument("--appends", type=int, default=20000)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    target = (128 if args.quick else 1024) * MIB
    root = Path(tempfile.mkdtemp(prefix="sluice-bench-recording-"))
    report: dict[str, Any] = {"appends": []}
    try:
        for concurrency in (1, 16, 128):
            total = args.appends // 10 if concurrency == 1 else args.appends
            row = asyncio.run(append_throughput(root, total, concurrency))
            report["appends"].append(row)
            print(
                f"append x{concurrency:<4} {row['records_per_s']:>8} records/s "
                f"{row['mb_per_s']:>6} MB/s  {row['records_per_fsync']:>6} records/fsync"
            )
        directory = root / "big"
        generated, elapsed = time_it(lambda: generate(directory, target))
        report["generated"] = {k: v for k, v in generated.items() if k != "path"}
        report["generated"]["seconds"] = round(elapsed, 1)
        print(
            f"generated {generated['bytes'] / MIB:.0f} MiB, {generated['records']} records, "
            f"{generated['sessions']} sessions in {elapsed:.1f}s"
        )
        report["read"] = read_benchmarks(directory, generated)
        for key, value in report["read"].items():
            print(f"  {key:<22} {value}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
