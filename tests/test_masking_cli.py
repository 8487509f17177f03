"""``sluice mask``: masked text or JSON spans on stdout, exit 0, 2 for an unreadable file."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from proxy.masking.cli import run_mask
from proxy.masking.fakes import fake

KEY = b"cli-key"


def run(path: str | None, as_json: bool, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    code = run_mask(path, as_json, KEY, stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_masks_a_file(tmp_path: Path) -> None:
    secret = fake("github-pat", random.Random(1))[0]
    target = tmp_path / "env"
    target.write_bytes(f"A=1\nGH={secret}\n".encode())
    code, out, _ = run(str(target), False)
    assert code == 0
    assert out == b"A=1\nGH=ghp_" + b"*" * 36 + b"\n"


def test_json_output_lists_spans_without_the_secret(tmp_path: Path) -> None:
    secret = fake("stripe-secret-key", random.Random(2))[0]
    text = f"key: {secret}\n"
    code, out, _ = run(None, True, text.encode())
    assert code == 0
    doc = json.loads(out)
    assert doc["masked"] == "key: sk_live_" + "*" * (len(secret) - 8) + "\n"
    [span] = doc["spans"]
    assert set(span) == {"start", "end", "rule", "fingerprint"}
    assert (span["start"], span["end"], span["rule"]) == (5, 5 + len(secret), "stripe-secret-key")
    assert secret[8:] not in out.decode()


def test_nothing_to_mask_still_exits_zero() -> None:
    code, out, _ = run("-", True, b"hello\n")
    assert code == 0 and json.loads(out) == {"masked": "hello\n", "spans": []}
    assert run(None, False, b"plain")[:2] == (0, b"plain")


def test_unreadable_file_exits_two(tmp_path: Path) -> None:
    code, out, err = run(str(tmp_path / "missing"), False)
    assert code == 2 and out == b"" and b"cannot read" in err
    code, _, err = run(str(tmp_path), False)  # a directory
    assert code == 2 and b"cannot read" in err
