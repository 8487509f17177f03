"""``sluice verify``, ``sluice sessions`` and ``sluice export-har`` as plain functions.

Each returns the process exit code and prints to stdout (results) or stderr (usage
errors); the proxy's CLI wires them into argparse. Exit codes: 0 all good, 1 a finding
(a damaged or unsigned file, an unknown session), 2 bad usage (a missing path, an
unreadable key).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from proxy.recording.files import write_new_private
from proxy.recording.har import build_har
from proxy.recording.keys import KeyFileError, load_public_key_file
from proxy.recording.reader import Recording
from proxy.recording.verify import REPAIRED, TAMPERED, TORN, UNSIGNED, VERIFIED, verify

_SEVERITY = {VERIFIED: 0, REPAIRED: 1, UNSIGNED: 2, TORN: 3, TAMPERED: 4}


def _usage(command: str, message: str) -> int:
    print(f"sluice {command}: {message}", file=sys.stderr)
    return 2


def run_verify(paths: list[str], *, public_key: str | None = None) -> int:
    """Exit 0 if every file is intact and signed, 1 naming each bad file, 2 on bad usage."""
    if not paths:
        return _usage("verify", "give at least one recording file or directory")
    for raw in paths:
        if not Path(raw).exists():
            return _usage("verify", f"no such file or directory: {raw}")
    key = None
    if public_key is not None:
        try:
            key = load_public_key_file(Path(public_key))
        except KeyFileError as exc:
            return _usage("verify", f"--public-key: {exc}")
    results = verify(paths, public_key=key)
    if not results:
        return _usage("verify", "no recording files found")
    for result in results:
        print(result.describe())
    bad = [result for result in results if not result.ok]
    if bad:
        print(f"{len(bad)} of {len(results)} recording files failed verification")
        return 1
    return 0


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def run_sessions(recordings_dir: str, as_json: bool = False) -> int:
    """List recorded sessions with counts and the integrity of the files holding them."""
    directory = Path(recordings_dir)
    if not directory.is_dir():
        return _usage("sessions", f"not a directory: {recordings_dir}")
    with Recording.open(directory) as recording:
        summaries = recording.sessions()
        states = {result.path.name: result.state for result in verify(recording.files)}
    rows: list[dict[str, Any]] = []
    for summary in summaries:
        worst = max((states.get(name, TAMPERED) for name in summary.files), key=_SEVERITY.get)
        rows.append({**summary.as_dict(), "integrity": worst})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    header = (
        "SESSION",
        "SUBJECT",
        "START",
        "DURATION",
        "REQS",
        "DENIED",
        "HELD",
        "MASKED",
        "INTEGRITY",
    )
    table = [header]
    for row in rows:
        start = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["start"]))
        table.append(
            (
                row["id"],
                str(row["subject"] or "-"),
                start,
                _duration(row["duration"]),
                str(row["requests"]),
                str(row["denied"]),
                str(row["held"]),
                str(row["masked"]),
                row["integrity"],
            )
        )
    widths = [max(len(line[n]) for line in table) for n in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not rows:
        print("(no sessions recorded)")
    return 0


def run_export_har(
    path: str, output: str, session: str | None = None, request_id: str | None = None
) -> int:
    """Write HAR 1.2 for a session, one request, or everything; ``output`` "-" is stdout."""
    source = Path(path)
    if not source.exists():
        return _usage("export-har", f"no such file or directory: {path}")
    with Recording.open(source) as recording:
        if request_id is not None:
            flow = recording.flow(request_id)
            if flow is None:
                print(f"sluice export-har: no request {request_id!r} recorded", file=sys.stderr)
                return 1
            flows = [flow]
        elif session is not None:
            flows = recording.flows(session)
            if not flows:
                print(f"sluice export-har: no session {session!r} recorded", file=sys.stderr)
                return 1
        else:
            flows = [f for s in recording.sessions() for f in recording.flows(s.id)]
        har = build_har(recording, flows)
    data = json.dumps(har, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        target = Path(output)
        if target.is_symlink():
            return _usage("export-har", f"{output} is a symlink; refusing to write through it")
        write_new_private(target, data)
    return 0
