"""``sluice mask [FILE] [--json]``: mask a file or stdin the way the proxy masks bodies.

Prints the masked bytes, or with ``--json`` an object with the masked text and the spans
(offsets, rule, keyed fingerprint; never the secret). Exit status 0 whether or not anything
was masked, 2 when the file cannot be read.
"""

from __future__ import annotations

import json
import sys
from typing import BinaryIO

from proxy.masking.engine import Masker

CHUNK = 1 << 16


def run_mask(
    path: str | None,
    as_json: bool,
    hmac_key: bytes,
    *,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    masker: Masker | None = None,
) -> int:
    """Mask ``path`` (or stdin when ``None`` or ``"-"``), streaming unless ``as_json``."""
    source = stdin if stdin is not None else sys.stdin.buffer
    out = stdout if stdout is not None else sys.stdout.buffer
    err = stderr if stderr is not None else sys.stderr.buffer
    try:
        handle = source if path in (None, "-") else open(path, "rb")  # noqa: SIM115
    except OSError as exc:
        err.write(f"sluice mask: cannot read {path}: {exc.strerror or exc}\n".encode())
        return 2
    masker = masker or Masker(hmac_key=hmac_key)
    stream = masker.stream()
    try:
        parts = []
        while chunk := handle.read(CHUNK):
            released = stream.feed(chunk)
            if as_json:
                parts.append(released)
            else:
                out.write(released)
    except OSError as exc:
        err.write(f"sluice mask: cannot read {path or 'stdin'}: {exc.strerror or exc}\n".encode())
        stream.close()
        return 2
    finally:
        if handle is not source:
            handle.close()
    tail = stream.finish()
    if as_json:
        masked = b"".join(parts) + tail
        document = {
            "masked": masked.decode("utf-8", "replace"),
            "spans": [span.as_dict() for span in stream.spans],
        }
        out.write(json.dumps(document, ensure_ascii=False).encode() + b"\n")
    else:
        out.write(tail)
    out.flush()
    return 0
