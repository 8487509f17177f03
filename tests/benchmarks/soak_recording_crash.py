#!/usr/bin/env python3
"""Soak: ``kill -9`` the proxy under load many times; the recording must survive every one.

Run from the repository root::

    .venv/bin/python tests/benchmarks/soak_recording_crash.py [--cycles N] [--seed S]

The same loop as ``tests/test_recording_crash.py`` (``crash_loop``), for longer (default
200 cycles): start ``python -m proxy proxy``, drive a few asyncio clients through it at a
counting upstream on 127.0.0.1, SIGKILL it after 0.3-0.8 s (every 7th cycle while it is
still starting; every 4th cycle the newest file is also torn by hand), then check that no
recording file is tampered, that only the newest may be unsigned or torn, and, after the
restart, that every request the upstream received has its request record. At the end the
proxy stops cleanly and every file must verify.

Prints one line per cycle and a summary; exits 0 when every check held, 1 on the first
failure (with the seed to replay it), 2 if it crashed. Works in a temporary directory,
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # crash_loop and its helpers live beside the tests
    sys.path.insert(0, str(TESTS))

from test_recording_crash import CrashFailure, CycleResult, crash_loop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200, help="kills (default 200)")
    parser.add_argument("--seed", type=int, default=None, help="replay a run")
    parser.add_argument("--min-load", type=float, default=0.3, help="seconds of load, at least")
    parser.add_argument("--max-load", type=float, default=0.8, help="seconds of load, at most")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns() % 1_000_000
    workdir = Path(tempfile.mkdtemp(prefix="sluice-soak-recording-"))
    states: Counter[str] = Counter()
    started = time.monotonic()

    def on_cycle(result: CycleResult) -> None:
        states[result.newest or "none"] += 1
        how = "early kill" if result.early_kill else f"{result.ran_for:.2f}s load"
        if result.torn_after:
            how += ", torn"
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(result.statuses.items()))
        print(
            f"cycle {result.cycle + 1:>4}/{args.cycles}  {how:<20} sent {result.sent:>5}  "
            f"forwarded {result.forwarded:>5}  [{statuses}]  files {result.files:>4}  "
            f"newest {result.newest}  start {result.restart_s:.2f}s",
            flush=True,
        )

    print(f"seed {seed}, {args.cycles} cycles, working in {workdir}", flush=True)
    try:
        summary = asyncio.run(
            crash_loop(
                workdir,
                args.cycles,
                seed=seed,
                load_seconds=(args.min_load, args.max_load),
                on_cycle=on_cycle,
            )
        )
    except CrashFailure as exc:
        print(f"\nFAIL after {time.monotonic() - started:.0f}s (seed {seed}): {exc}")
        print(f"proxy log: {workdir / 'proxy.log'} (kept)")
        return 1
    except Exception:
        traceback.print_exc()
        print(f"\ncrashed (seed {seed}); working directory kept: {workdir}")
        return 2
    else:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    cycles = summary.cycles
    print(
        f"\nPASS: {len(cycles)} kills in {summary.seconds:.0f}s (seed {seed})\n"
        f"  requests sent {sum(c.sent for c in cycles)}, forwarded {summary.forwarded}, "
        f"all recorded ({summary.recorded_requests} request records)\n"
        f"  early kills {sum(c.early_kill for c in cycles)}, hand-torn tails {summary.tears}, "
        f"torn tails left by SIGKILL itself {summary.torn_seen}\n"
        f"  newest file after a kill: "
        + ", ".join(f"{state} {count}" for state, count in states.most_common())
        + f"\n  after the clean stop: {summary.final_states} "
        f"({summary.broken_copies} .broken copies kept)"
    )
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        raise SystemExit(2) from None
