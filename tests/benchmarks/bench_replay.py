#!/usr/bin/env python3
"""How fast ``sluice replay`` opens a 1 GiB recording and jumps to its last event.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_replay.py [--quick] [--session-mib N]

1. Generates a recording of 1 GiB (``--quick``: 128 MiB) with the recording benchmark's
   generator (realistic requests, decisions, masked responses, signed checkpoints), and
   builds the reader's index once (the cache every later open uses).
2. Times the real app, headless (Textual's ``run_test``; times include its wait for the
   screen to be drawn): from start to the sessions browser on screen (**open**); opening
   the newest session; jumping from its first to its last event, which is the last
   event of the recording (**jump**); and ``--session ID``, from start to that session
   drawn at its last event. The integrity check runs meanwhile (a child process), as it
   does for a person.
3. For context (no threshold): one session of ``--session-mib`` MiB, the worst case for
   loading a session, since a session's records are read when it is opened.

Prints PASS or MISS against 1 second for open and jump; always exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from console.replay_app import ReplayApp
from console.replay_screen import ReplayScreen
from console.replay_screens import SessionsScreen
from proxy.recording import Recording
from proxy.recording import format as fmt
from proxy.recording.files import file_name
from proxy.recording.keys import Signer, publish_public_key
from tests.benchmarks.bench_recording import generate

MIB = 1024 * 1024
LIMIT = 1.0


async def _until(pilot: Any, check: Any, limit: float = 120.0) -> float:
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > limit:
            raise TimeoutError("the app did not get there")
        await pilot.pause(0.005)
    return time.perf_counter()


async def time_app(directory: Path) -> dict[str, float]:
    """Open to the browser; open the newest session; first event; then the last one."""
    started = time.perf_counter()
    app = ReplayApp(directory, utc=True)
    out: dict[str, float] = {}
    async with app.run_test(size=(150, 48)) as pilot:
        shown = await _until(pilot, lambda: isinstance(app.screen, SessionsScreen))
        out["open_s"] = shown - started
        out["sessions"] = len(app.sessions)
        began = time.perf_counter()
        await pilot.press("end", "enter")
        screen_ready = await _until(pilot, lambda: isinstance(app.screen, ReplayScreen))
        out["open_session_s"] = screen_ready - began
        screen = app.screen
        assert isinstance(screen, ReplayScreen)
        await pilot.press("g")
        began = time.perf_counter()
        await pilot.press("G")
        last = len(screen.timeline) - 1
        done = await _until(pilot, lambda: screen.store.position == last)
        out["jump_last_s"] = done - began
        out["last_seq"] = screen.timeline.events[-1].seq
        out["recording_last_seq"] = app.recording.last_seq or 0
        out["verified_meanwhile"] = app.results is not None
        newest = screen.timeline.info.id
        await pilot.press("q")
    started = time.perf_counter()
    app = ReplayApp(directory, utc=True, session=newest)
    async with app.run_test(size=(150, 48)) as pilot:
        await _until(
            pilot,
            lambda: (
                isinstance(app.screen, ReplayScreen)
                and app.screen.store.position == len(app.screen.timeline) - 1
            ),
        )
        out["direct_s"] = time.perf_counter() - started
        await pilot.press("q")
    return out


def one_session(directory: Path, target: int) -> dict[str, Any]:
    """One session of about ``target`` bytes: request, decision, response, repeated."""
    directory.mkdir(mode=0o700, parents=True)
    signer = Signer.generate()
    publish_public_key(directory, signer)
    path = directory / file_name(time.time() - 3600, 1)
    seq, head, now, written = 0, fmt.GENESIS, time.time() - 3600, 0
    body = {"text": "x" * 2000}
    with open(path, "wb", buffering=8 * MIB) as out:

        def put(kind: str, fields: dict[str, Any]) -> None:
            nonlocal seq, head, now, written
            seq, now = seq + 1, now + 0.001
            if kind == fmt.CHECKPOINT:
                record = fmt.make_checkpoint(
                    seq,
                    now,
                    head,
                    from_seq=1,
                    chain="bench",
                    key_id=signer.key_id,
                    sign=signer.sign,
                )
            else:
                record = fmt.build_record(seq, now, head, kind, fields)
            line = fmt.encode_record(record)
            out.write(line)
            head, written = fmt.line_hash(line), written + len(line)

        put(fmt.FILE_START, {"file": path.name, "index": 1, "chain": "bench", "prev_file": None})
        put(fmt.SESSION_START, {"session": "big", "subject": "agent", "groups": ["dev"]})
        n = 0
        while written < target:
            rid = f"r{n:08d}"
            put(fmt.REQUEST, {"session": "big", "request_id": rid, "method": "GET",
                              "target": "api", "url": f"/items/{n}", "headers": []})  # fmt: skip
            put(fmt.DECISION, {"session": "big", "request_id": rid, "action": "allowed"})
            put(fmt.RESPONSE, {"session": "big", "request_id": rid, "status": 200,
                               "mask_spans": [], "headers": [], "body": body})  # fmt: skip
            n += 1
        put(fmt.CHECKPOINT, {})
    return {"bytes": written, "records": seq, "requests": n}


def verdict(seconds: float) -> str:
    return "PASS" if seconds < LIMIT else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB instead of 1 GiB")
    parser.add_argument("--session-mib", type=int, default=32, help="the one-session case")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    target = (128 if args.quick else 1024) * MIB
    root = Path(tempfile.mkdtemp(prefix="sluice-bench-replay-"))
    report: dict[str, Any] = {}
    try:
        directory = root / "many"
        started = time.perf_counter()
        generated = generate(directory, target)
        print(
            f"generated {generated['bytes'] / MIB:.0f} MiB, {generated['records']:,} records, "
            f"{generated['sessions']:,} sessions in {time.perf_counter() - started:.1f}s"
        )
        started = time.perf_counter()
        Recording.open(directory).close()
        report["index_build_s"] = round(time.perf_counter() - started, 2)
        print(f"index built once (then cached) in {report['index_build_s']}s")
        started = time.perf_counter()
        Recording.open(directory).close()
        report["reader_open_cached_s"] = round(time.perf_counter() - started, 4)
        app = asyncio.run(time_app(directory))
        report["app"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in app.items()}
        assert app["last_seq"] == app["recording_last_seq"] - 1  # all but the final seal
        print(f"  reader open (cached index)              {report['reader_open_cached_s']:.3f}s")
        opened = app["open_s"]
        print(f"  open: start to the sessions list        {opened:.3f}s  {verdict(opened)}")
        print(f"  open the newest session (Enter)         {app['open_session_s']:.3f}s")
        print(
            f"  jump: first to last event (G)           {app['jump_last_s']:.3f}s  "
            f"{verdict(app['jump_last_s'])}"
        )
        print(
            f"  --session ID: start to its last event   {app['direct_s']:.3f}s  "
            f"{verdict(app['direct_s'])}"
        )
        note = "finished" if app["verified_meanwhile"] else "still running"
        print(f"  (integrity check in its child process: {note} during the jump)")
        big = root / "one"
        made = one_session(big, args.session_mib * MIB)
        Recording.open(big).close()
        info = asyncio.run(time_app(big))
        report["one_session"] = {
            **made,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()},
        }
        print(
            f"context: one session of {made['bytes'] / MIB:.0f} MiB ({made['requests']:,} "
            f"requests): open {info['open_s']:.3f}s, load the session "
            f"{info['open_session_s']:.3f}s, jump first->last {info['jump_last_s']:.3f}s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
