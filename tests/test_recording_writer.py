"""The writer: durable group commit, fail-closed on write errors, redaction, sidecars."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import itertools
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from test_recording_support import (
    all_bytes,
    only_file,
    record_session,
    recorder,
    records_of,
    slow_disk,
)

from proxy.recording import Recorder, RecorderUnavailable, Recording
from proxy.recording import writer as writer_module
from proxy.recording.files import list_recordings
from proxy.recording.verify import verify


@pytest.mark.asyncio
async def test_group_commit_fsyncs_far_less_than_once_per_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = recorder(tmp_path, checkpoint_every=10_000)
    await rec.open()
    real_fsync = os.fsync
    durable: set[int] = set()
    calls = 0

    def counting_fsync(fd: int) -> None:
        nonlocal calls
        time.sleep(0.002)  # a disk that takes its time, so appenders pile up
        real_fsync(fd)
        calls += 1
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return
        size = info.st_size
        with open(f"/proc/self/fd/{fd}", "rb") as handle:
            data = handle.read(size)
        durable.update(json.loads(line)["seq"] for line in data.splitlines())

    monkeypatch.setattr(os, "fsync", counting_fsync)

    async def one(n: int) -> int:
        await asyncio.sleep((n % 20) * 0.001)  # arrivals spread over ~20 ms, in waves
        seq = await rec.append("request", request_id=f"r{n}", session="s1", method="GET")
        assert seq in durable, f"append {seq} returned before its fsync"
        return seq

    batches_before = rec.stats.batches
    seqs = await asyncio.gather(*(one(n) for n in range(200)))
    assert sorted(seqs) == list(range(2, 202))
    assert 1 <= calls <= 40, calls
    assert rec.stats.batches - batches_before == calls
    monkeypatch.setattr(os, "fsync", real_fsync)
    await rec.close()
    assert verify([tmp_path / "rec"])[0].state == "verified"


@pytest.mark.asyncio
async def test_the_event_loop_is_not_blocked_by_a_slow_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = recorder(tmp_path)
    await rec.open()
    slow_disk(monkeypatch, 0.2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await rec.append("error", reason="slow disk")
    task.cancel()
    assert ticks >= 10
    monkeypatch.undo()
    await rec.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["write", "fsync"])
async def test_a_write_error_fails_closed_until_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    rec = recorder(tmp_path)
    changes: list[tuple[str, str | None]] = []
    rec.on_state_change(lambda state, reason: changes.append((state, reason)))
    await rec.open()
    await record_session(rec, requests=2)
    real_write, real_fsync = writer_module._write, os.fsync

    def full_disk(fd: int, data: bytes) -> None:
        real_write(fd, data[: len(data) // 2])  # half a batch reaches the file
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    if where == "write":
        monkeypatch.setattr(writer_module, "_write", full_disk)
    else:
        monkeypatch.setattr(os, "fsync", failing_fsync)
    results = await asyncio.gather(
        *(rec.append("request", request_id=f"x{n}", session="s1") for n in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, RecorderUnavailable) for r in results), results
    expected = "ENOSPC" if where == "write" else "EIO"
    assert rec.state == "failed" and expected in (rec.failure or "")
    assert changes[-1][0] == "failed" and expected in (changes[-1][1] or "")
    assert str(tmp_path) not in (rec.failure or "")
    with pytest.raises(RecorderUnavailable, match=expected):
        await rec.append("error", reason="still failing")
    monkeypatch.setattr(writer_module, "_write", real_write)
    monkeypatch.setattr(os, "fsync", real_fsync)
    await rec.recover()
    assert changes[-1] == ("ok", None)
    await rec.append("error", reason="recorded again")
    await rec.close()
    records = records_of(only_file(tmp_path / "rec"))
    kinds = [r["kind"] for r in records]
    assert not any(r.get("request_id", "").startswith("x") for r in records)
    assert ("recorder.recovered" in kinds) or ("recorder.resumed" in kinds)
    if where == "write":
        recovered = next(r for r in records if r["kind"] == "recorder.recovered")
        assert recovered["cause"] == "write_error" and recovered["truncated_bytes"] > 0
    assert verify([tmp_path / "rec"])[0].ok


@pytest.mark.asyncio
async def test_a_closed_file_is_a_write_error(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    failures: list[str] = []
    rec.on_state_change(lambda state, _reason: failures.append(state))
    await rec.open()
    assert rec._disk._fd is not None
    os.close(rec._disk._fd)  # someone closed our descriptor
    with pytest.raises(RecorderUnavailable, match="EBADF"):
        await rec.append("error", reason="x")
    assert failures == ["ok", "failed"]
    rec._disk._fd = None
    await rec.recover()
    await rec.close()
    assert verify([tmp_path / "rec"])[0].ok


CANARY = "canary-7d1f0e9b2c"


@pytest.mark.asyncio
async def test_credentials_are_redacted_everywhere(tmp_path: Path) -> None:
    rec = recorder(tmp_path, redact_headers=["X-Upstream-Key"], max_inline_body=64)
    await rec.open()
    await rec.append("session.start", session="s1", subject="alice", token_id="jti-1")
    await rec.append(
        "request",
        request_id="r1",
        session="s1",
        method="GET",
        url=f"https://bot:{CANARY}@api.example.com/x?key={CANARY}",
        headers=[
            ("Authorization", f"Bearer {CANARY}"),
            ("Proxy-Authorization", f"Basic {CANARY}"),
            ("Cookie", f"session={CANARY}"),
            ("X-Api-Key", CANARY),
            ("x-upstream-key", CANARY),
            ("X-Forwarded-Token", f"prefix-{CANARY}-suffix"),
            ("Accept", "application/json"),
        ],
        injected=["X-Api-Key"],
        secret_values=[CANARY],
        body=b"a" * 100,  # a sidecar, so blobs are searched too
    )
    await rec.append(
        "response",
        request_id="r1",
        status=200,
        headers={"Set-Cookie": f"id={CANARY}", "Content-Type": "text/plain"},
        body="fine",
    )
    await rec.close()
    with Recording.open(tmp_path / "rec") as recording:
        recording.sessions()  # writes the .idx cache too
        request = recording.flow("r1").request  # type: ignore[union-attr]
    assert CANARY.encode() not in all_bytes(tmp_path / "rec")
    headers = dict(request["headers"])
    for name in ("Authorization", "Proxy-Authorization", "Cookie", "X-Api-Key", "x-upstream-key"):
        assert headers[name] == "[REDACTED]"
    assert headers["X-Forwarded-Token"] == "prefix-[REDACTED]-suffix"
    assert headers["Accept"] == "application/json"
    assert request["injected"] == ["x-api-key"]
    assert "secret_values" not in request


@pytest.mark.asyncio
async def test_a_large_body_goes_to_a_sidecar_and_reads_back_exactly(tmp_path: Path) -> None:
    rec = recorder(tmp_path, max_inline_body=64 * 1024)
    await rec.open()
    big = os.urandom(1024 * 1024)
    text = ("zürich ✓ " * 40_000).encode()
    small_binary = bytes(range(256)) * 4
    await rec.append("request", request_id="r1", session="s", method="PUT", body=big)
    await rec.append("response", request_id="r1", status=200, body=text)
    await rec.append("request", request_id="r2", session="s", method="POST", body=small_binary)
    await rec.append("response", request_id="r2", status=204, body=b"")
    await rec.close()
    blob = tmp_path / "rec" / "blobs" / hashlib.sha256(big).hexdigest()
    assert blob.read_bytes() == big
    assert oct(blob.stat().st_mode & 0o777) == "0o600"
    records = {(r["kind"], r.get("request_id")): r for r in records_of(only_file(tmp_path / "rec"))}
    assert records[("request", "r1")]["body"] == {"blob": blob.name, "size": len(big)}
    assert records[("request", "r2")]["body"] == {"b64": base64.b64encode(small_binary).decode()}
    assert records[("response", "r2")]["body"] == {"text": ""}
    with Recording.open(tmp_path / "rec") as recording:
        flow1, flow2 = recording.flow("r1"), recording.flow("r2")
        assert flow1 is not None and flow2 is not None
        assert recording.body(flow1, "request") == big
        assert recording.body(flow1, "response") == text
        assert recording.body(flow2, "request") == small_binary
        assert recording.body(flow2, "response") == b""
        assert recording.body(flow1.request, "request") == big  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            recording.body(flow1.request, "response")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_truncate_mode_marks_what_was_kept(tmp_path: Path) -> None:
    rec = recorder(tmp_path, max_inline_body=10, oversize="truncate")
    await rec.open()
    await rec.append("response", request_id="r1", status=200, body="ééééééééé")  # 18 bytes
    await rec.append("response", request_id="r2", status=200, body=b"\xff" * 50)
    await rec.close()
    records = [r for r in records_of(only_file(tmp_path / "rec")) if r["kind"] == "response"]
    assert records[0]["body"] == {"truncated": True, "size": 18, "kept": 10, "text": "ééééé"}
    assert records[1]["body"]["truncated"] is True and records[1]["body"]["kept"] == 10
    assert base64.b64decode(records[1]["body"]["b64"]) == b"\xff" * 10
    assert not any((tmp_path / "rec" / "blobs").iterdir())


@pytest.mark.asyncio
async def test_checkpoints_by_count_by_time_at_session_end_and_close(tmp_path: Path) -> None:
    rec = recorder(tmp_path, checkpoint_every=5, checkpoint_seconds=0.2)
    await rec.open()
    for n in range(12):
        await rec.append("error", reason=f"e{n}")
    await asyncio.sleep(0.5)  # idle: the timer seals what is pending
    await rec.append("session.start", session="s9", subject="bob")
    await rec.append("session.end", session="s9")
    path = only_file(tmp_path / "rec")
    records = records_of(path)
    assert records[-1]["kind"] == "checkpoint"  # sealed at session end, before close
    assert verify([path])[0].state == "verified"
    await rec.append("error", reason="last")
    await rec.close()
    records = records_of(path)
    checkpoints = [r for r in records if r["kind"] == "checkpoint"]
    assert len(checkpoints) >= 5
    assert records[-1]["kind"] == "checkpoint"
    for before, after in itertools.pairwise(checkpoints):
        assert after["from_seq"] == before["seq"] + 1
    assert verify([path])[0].state == "verified"


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time() - 10 * 86400

    def __call__(self) -> float:
        return self.now


@pytest.mark.asyncio
async def test_rotation_by_age_and_retention(tmp_path: Path) -> None:
    clock = FakeClock()
    options: dict[str, Any] = {
        "rotate_seconds": 3600,
        "retention_seconds": 2 * 86400,
        "max_inline_body": 8,
        "clock": clock,
    }
    rec = recorder(tmp_path, **options)
    await rec.open()
    for day in range(4):
        await rec.append("response", request_id=f"d{day}", status=200, body=f"day {day} body")
        await rec.append("response", request_id=f"shared{day}", status=200, body="shared body!")
        clock.now += 86400
    await rec.close()
    directory = tmp_path / "rec"
    files = list_recordings(directory)
    assert len(files) == 4
    firsts = [records_of(path)[0] for path in files]
    assert [f.get("rotated_by") for f in firsts] == [None, "age", "age", "age"]
    for n, path in enumerate(files):  # make file mtimes match the fake clock
        stamp = clock.now - (4 - n) * 86400
        os.utime(path, (stamp, stamp))
    for blob in (directory / "blobs").iterdir():
        os.utime(blob, (clock.now - 9 * 86400,) * 2)
    blob_of = {day: hashlib.sha256(f"day {day} body".encode()).hexdigest() for day in range(4)}
    rec = Recorder(directory, tmp_path / "state" / "recording-signing.pem", **options)
    await rec.open()
    await asyncio.sleep(0.1)
    await rec.close()
    left = list_recordings(directory)
    assert [p.name for p in left] == [p.name for p in files[2:]]
    remaining_blobs = {p.name for p in (directory / "blobs").iterdir()}
    assert blob_of[0] not in remaining_blobs and blob_of[1] not in remaining_blobs
    assert blob_of[2] in remaining_blobs and blob_of[3] in remaining_blobs
    assert hashlib.sha256(b"shared body!").hexdigest() in remaining_blobs
    retention = [r for r in records_of(left[-1]) if r["kind"] == "recorder.retention"]
    assert retention and retention[0]["deleted"] == [p.name for p in files[:2]]
    assert [r.state for r in verify([directory])] == ["verified", "verified"]
