"""``python -m console.replay_verify FILE...``: ``verify`` in a process of its own.

The replay app runs it as a child: verifying a large recording hashes every line and
would hold the GIL for seconds, starving the UI thread. The public key (PEM), if any,
comes on stdin; the results go to stdout as JSON, one object per file.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy.recording import FileResult, verify
from proxy.recording.keys import load_public_key


def encode(results: Sequence[FileResult]) -> str:
    return json.dumps([{**dataclasses.asdict(r), "path": str(r.path)} for r in results])


def decode(text: str) -> list[FileResult]:
    items: list[dict[str, Any]] = json.loads(text)
    return [FileResult(**{**item, "path": Path(item["path"])}) for item in items]


def main(argv: Sequence[str] | None = None) -> int:
    files = list(sys.argv[1:] if argv is None else argv)
    pem = sys.stdin.buffer.read()
    key = load_public_key(pem) if pem.strip() else None
    sys.stdout.write(encode(verify(files, public_key=key)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
