"""Helpers shared by the recording tests (imported as ``test_recording_support``), plus
checks of the on-disk basics: modes, keys, links refused."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.recording import RecorderUnavailable, Recording
from proxy.recording.files import list_recordings
from proxy.recording.writer import Recorder

MASKED = b'{"token": "ghp_****************************", "ok": true}'


def slow_disk(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every fsync takes ``seconds`` longer (until the monkeypatch is undone)."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(seconds)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)


def recorder(tmp_path: Path, **options: Any) -> Recorder:
    options.setdefault("retention_seconds", None)
    return Recorder(tmp_path / "rec", tmp_path / "state" / "recording-signing.pem", **options)


async def record_session(
    rec: Recorder,
    session: str = "s1",
    *,
    requests: int = 3,
    subject: str = "alice",
    end: bool = True,
    prefix: str = "",
) -> None:
    """A session whose second request is denied, third held then approved, first masked."""
    await rec.append(
        "session.start", session=session, subject=subject, groups=["dev"], token_id="tok-1"
    )
    for n in range(requests):
        request_id = f"{prefix}{session}-r{n}"
        await rec.append(
            "request",
            request_id=request_id,
            session=session,
            method="POST",
            target="github",
            url=f"https://api.github.com/repos/x/y/issues?page={n}",
            headers={"Content-Type": "application/json", "Authorization": "Bearer agent-token"},
            body=b'{"title": "hello"}',
        )
        if n % 3 == 1:
            await rec.append(
                "decision",
                request_id=request_id,
                action="denied",
                rule="no-push",
                reason="pushes are not allowed",
            )
            continue
        if n % 3 == 2:
            await rec.append(
                "decision", request_id=request_id, action="held", rule="ask", reason="needs a human"
            )
            await rec.append(
                "decision",
                request_id=request_id,
                action="approved",
                rule="ask",
                reason="ok",
                approver="grace",
                scope="once",
                timing={"waited_ms": 1200},
            )
        else:
            await rec.append(
                "decision",
                request_id=request_id,
                action="allowed",
                rule="read",
                reason="reads are fine",
            )
        spans = [{"start": 11, "end": 51, "rule": "github-pat", "fingerprint": "ab" * 8}]
        await rec.append(
            "response",
            request_id=request_id,
            status=200,
            headers=[("Content-Type", "application/json"), ("Set-Cookie", "sid=secret")],
            body=MASKED,
            mask_spans=spans if n % 3 == 0 else [],
        )
    if end:
        await rec.append("session.end", session=session)


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines_of(path)]


def only_file(directory: Path) -> Path:
    files = list_recordings(directory)
    assert len(files) == 1, files
    return files[0]


def all_bytes(directory: Path) -> bytes:
    """Every byte under a directory: for "this secret appears nowhere" checks."""
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


# --------------------------------------------------------------------------- basics


@pytest.mark.asyncio
async def test_files_keys_and_directories_are_private(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    await rec.open()
    await record_session(rec)
    await rec.close()
    directory = tmp_path / "rec"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "blobs").stat().st_mode) == 0o700
    assert stat.S_IMODE(only_file(directory).stat().st_mode) == 0o600
    key = tmp_path / "state" / "recording-signing.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in key.read_bytes()
    assert b"PUBLIC KEY" in (directory / "recording-key.pub").read_bytes()
    first = records_of(only_file(directory))[0]
    assert first["kind"] == "recorder.file" and first["seq"] == 1 and first["prev"] == "0" * 64
    assert first["file"] == only_file(directory).name and first["index"] == 1


@pytest.mark.asyncio
async def test_the_key_survives_restarts_and_is_not_replaced(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    await rec.open()
    first_id = rec.key_id
    await rec.close()
    rec = recorder(tmp_path)
    await rec.open()
    assert rec.key_id == first_id
    await rec.close()


@pytest.mark.asyncio
async def test_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "rec").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RecorderUnavailable, match="symlink"):
        await recorder(tmp_path).open()


@pytest.mark.asyncio
async def test_a_planted_recording_symlink_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    directory.mkdir(mode=0o700)
    (tmp_path / "target").write_bytes(b"")
    (directory / "20990101T000000Z-000009.jsonl").symlink_to(tmp_path / "target")
    with pytest.raises(RecorderUnavailable, match="symlink"):
        await recorder(tmp_path).open()
    assert (tmp_path / "target").read_bytes() == b""


@pytest.mark.asyncio
async def test_a_symlinked_blob_fails_closed(tmp_path: Path) -> None:
    import hashlib

    rec = recorder(tmp_path, max_inline_body=10)
    await rec.open()
    body = b"x" * 100
    (tmp_path / "target").write_bytes(b"")
    os.symlink(tmp_path / "target", tmp_path / "rec" / "blobs" / hashlib.sha256(body).hexdigest())
    with pytest.raises(RecorderUnavailable):
        await rec.append("response", request_id="r1", status=200, body=body)
    assert rec.state == "failed"
    assert (tmp_path / "target").read_bytes() == b""
    await rec.close()


@pytest.mark.asyncio
async def test_reserved_kinds_and_bad_values_are_refused_without_breaking_the_chain(
    tmp_path: Path,
) -> None:
    rec = recorder(tmp_path)
    await rec.open()
    with pytest.raises(ValueError):
        await rec.append("checkpoint")
    with pytest.raises(ValueError):
        await rec.append("recorder.file")
    with pytest.raises(ValueError):
        await rec.append("Not A Kind")
    with pytest.raises(ValueError):
        await rec.append("error", seq=5)
    with pytest.raises(TypeError):
        await rec.append("error", reason=object())
    await rec.append("error", request_id="r1", reason="upstream timed out")
    await rec.close()
    with Recording.open(tmp_path / "rec") as recording:
        assert recording.counts["errors"] == 1


@pytest.mark.asyncio
async def test_append_before_open_and_after_close_is_unavailable(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    with pytest.raises(RecorderUnavailable):
        await rec.append("error", reason="x")
    await rec.open()
    await rec.close()
    with pytest.raises(RecorderUnavailable):
        await rec.append("error", reason="x")


@pytest.mark.asyncio
async def test_a_replaced_signing_key_keeps_older_files_verifiable(tmp_path: Path) -> None:
    from proxy.recording.verify import verify

    rec = recorder(tmp_path, rotate_bytes=1)
    await rec.open()
    await record_session(rec, "s1", requests=1)
    old_id = rec.key_id
    await rec.close()
    (tmp_path / "state" / "recording-signing.pem").unlink()  # lost key: a new one is made
    rec = recorder(tmp_path, rotate_bytes=1)
    await rec.open()
    await record_session(rec, "s2", requests=1)
    assert rec.key_id != old_id
    await rec.close()
    directory = tmp_path / "rec"
    assert old_id is not None
    assert (directory / f"recording-key.{old_id[:16]}.pub").exists()
    results = verify([directory])
    assert {r.state for r in results} == {"verified"}
    assert {kid for r in results for kid in r.key_ids} == {old_id, rec.key_id}
