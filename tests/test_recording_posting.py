"""Records nobody awaits (``Recorder.post``): order, failures, ``flush``; and lines in
either canonical encoding (orjson's, and the json module's of older files) verify."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from pathlib import Path

import pytest
from test_recording_support import only_file, recorder, records_of, slow_disk

from proxy.recording import RecorderUnavailable
from proxy.recording import format as fmt
from proxy.recording import writer as writer_module
from proxy.recording.verify import verify


@pytest.mark.asyncio
async def test_records_keep_their_order_behind_a_body_stored_as_a_sidecar(
    tmp_path: Path,
) -> None:
    rec = recorder(tmp_path, max_inline_body=1024)
    await rec.open()
    big = os.urandom(512 * 1024)
    rec.post("session.start", session="s1", subject="alice", groups=[], token_id=None)
    rec.post("request", request_id="r1", session="s1", method="PUT", body=big)
    seq = await rec.submit("decision", request_id="r1", session="s1", action="allowed")
    rec.post("response", request_id="r1", status=201, body=b"made")
    rec.post("request", request_id="r2", session="s1", method="GET")
    await rec.flush()
    records = records_of(only_file(tmp_path / "rec"))
    # flush() has returned: every record posted before it is on disk
    kinds = [(r["kind"], r.get("request_id")) for r in records if r["kind"] != "recorder.file"]
    assert kinds == [
        ("session.start", None),
        ("request", "r1"),
        ("decision", "r1"),
        ("response", "r1"),
        ("request", "r2"),
    ]
    decision = next(r for r in records if r["kind"] == "decision")
    assert decision["seq"] == seq
    request = next(r for r in records if r["kind"] == "request")
    assert request["body"] == {"blob": hashlib.sha256(big).hexdigest(), "size": len(big)}
    await rec.close()
    assert verify([tmp_path / "rec"])[0].state == "verified"


@pytest.mark.asyncio
async def test_a_posted_record_that_cannot_be_written_fails_the_recorder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rec = recorder(tmp_path)
    await rec.open()
    await rec.append("error", reason="before the disk filled")

    def full_disk(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "_write", full_disk)
    with caplog.at_level(logging.ERROR, logger="sluice.recording"):
        rec.post("response", request_id="r1", status=200, body=b"secret-free")
        await rec.flush()  # returns (never raises) once the write has failed
    assert rec.state == "failed" and "ENOSPC" in (rec.failure or "")
    assert any("ENOSPC" in r.getMessage() for r in caplog.records)
    with pytest.raises(RecorderUnavailable, match="ENOSPC"):
        rec.post("response", request_id="r2", status=200)
    with pytest.raises(RecorderUnavailable, match="ENOSPC"):
        await rec.submit("decision", request_id="r3", action="allowed")
    monkeypatch.undo()
    await rec.recover()
    await rec.close()
    records = records_of(only_file(tmp_path / "rec"))
    assert not any(r.get("request_id") in ("r1", "r2", "r3") for r in records)
    assert verify([tmp_path / "rec"])[0].ok


@pytest.mark.asyncio
async def test_flush_returns_under_load_that_never_lets_the_disk_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = recorder(tmp_path, checkpoint_every=100_000)
    await rec.open()
    slow_disk(monkeypatch, 0.005)
    stop = asyncio.Event()

    async def agent(number: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await rec.append("request", request_id=f"a{number}-{n}", session="s1")

    agents = [asyncio.create_task(agent(number)) for number in range(8)]
    await asyncio.sleep(0.05)
    rec.post("response", request_id="marker", status=200)
    posted = rec.current_file
    await asyncio.wait_for(rec.flush(), 5)  # the disk is busy the whole time
    assert posted is not None
    assert any(r.get("request_id") == "marker" for r in records_of(posted))
    stop.set()
    await asyncio.gather(*agents)
    monkeypatch.undo()
    await rec.close()


def test_a_line_in_either_canonical_encoding_parses_and_any_other_does_not() -> None:
    record = fmt.build_record(7, 1_700_000_000.5, "0" * 64, "response", {"held_ms": 1.5e-7})
    modern = fmt.encode_record(record)
    older = fmt._json_line(record)
    assert modern != older  # orjson writes 1.5e-7 where json wrote 1.5e-07
    assert fmt.parse_line(modern[:-1]) == record
    assert fmt.parse_line(older[:-1]) == record
    assert fmt.parse_line(older[:-1].replace(b'"kind":', b'"kind": ')) is None
    surrogate = fmt.build_record(8, 1.0, "0" * 64, "request", {"url": "/\udcff"})
    line = fmt.encode_record(surrogate)  # orjson refuses lone surrogates; json escapes them
    assert b"\\udcff" in line and fmt.parse_line(line[:-1]) == surrogate
    with pytest.raises(ValueError):
        fmt.encode_record({"held_ms": 2**70 * 1.0, "n": 2**70, "x": float("inf")})


@pytest.mark.asyncio
async def test_a_recording_written_by_the_json_module_still_verifies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt, "encode_record", fmt._json_line)  # the encoder before orjson
    rec = recorder(tmp_path)
    await rec.open()
    await rec.append("response", request_id="r1", status=200, duration_ms=1.5e-7)
    await rec.close()
    monkeypatch.undo()
    path = only_file(tmp_path / "rec")
    assert b'"duration_ms":1.5e-07' in path.read_bytes()
    assert verify([tmp_path / "rec"])[0].state == "verified"
    rec = recorder(tmp_path)  # and the new encoder continues the same file's chain
    await rec.open()
    await rec.append("response", request_id="r2", status=200, duration_ms=1.5e-7)
    await rec.close()
    assert b'"duration_ms":1.5e-7' in path.read_bytes()
    assert verify([tmp_path / "rec"])[0].state == "verified"
