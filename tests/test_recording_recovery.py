"""Crash recovery: torn tails are cut (a copy kept), corruption elsewhere is never touched."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_recording_support import lines_of, only_file, record_session, recorder, records_of

from proxy.recording import RecordingCorrupt
from proxy.recording.cli import run_verify
from proxy.recording.files import list_recordings
from proxy.recording.verify import verify


async def _closed_recording(tmp_path: Path) -> Path:
    rec = recorder(tmp_path)
    await rec.open()
    await record_session(rec, requests=4)
    await rec.close()
    return only_file(tmp_path / "rec")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "tail",
    [
        b'{"v":1,"seq":99,"ts":17000',  # a partial line: no newline
        b'{"v":1,"seq":99,"ts":1700000000.5,"prev":"ab\n',  # a newline, but not JSON
        b"\x00" * 700,  # a zero-filled extent after a power cut
    ],
    ids=["partial", "not-json", "zeros"],
)
async def test_a_torn_tail_is_cut_after_keeping_a_copy(tmp_path: Path, tail: bytes) -> None:
    path = await _closed_recording(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good + tail)
    rec = recorder(tmp_path)
    await rec.open()
    assert rec.problems == []
    broken = path.with_name(path.name + ".broken")
    assert broken.read_bytes() == good + tail
    assert path.read_bytes().startswith(good)
    await rec.append("error", reason="after recovery")
    await rec.close()
    records = records_of(path)
    recovered = next(r for r in records if r["kind"] == "recorder.recovered")
    assert recovered["cause"] == "torn_tail"
    assert recovered["truncated_bytes"] == len(tail)
    assert recovered["broken"] == broken.name
    [result] = verify([path])
    assert result.state == "repaired tail" and result.ok
    assert run_verify([str(tmp_path / "rec")]) == 0


@pytest.mark.asyncio
async def test_a_torn_only_record_in_a_fresh_file_restarts_the_file(tmp_path: Path) -> None:
    """A crash right after rotation: the newest file holds nothing but a partial line."""
    rec = recorder(tmp_path, rotate_bytes=1500)
    await rec.open()
    await record_session(rec, requests=3)
    await rec.close()
    files = list_recordings(tmp_path / "rec")
    newest = files[-1]
    newest.write_bytes(lines_of(newest)[0][:30])
    rec = recorder(tmp_path)
    await rec.open()
    await rec.close()
    first = records_of(newest)[0]
    assert first["kind"] == "recorder.file" and first["prev_file"] == files[-2].name
    assert [r.state for r in verify([tmp_path / "rec"])][-1] == "repaired tail"


@pytest.mark.asyncio
async def test_corruption_in_the_middle_is_reported_and_never_modified(tmp_path: Path) -> None:
    path = await _closed_recording(tmp_path)
    lines = lines_of(path)
    n = next(i for i, line in enumerate(lines) if i > 5 and b"hello" in line)
    lines[n] = lines[n].replace(b"hello", b"hellp")
    path.write_bytes(b"".join(lines))
    bad = n + 1
    before = path.read_bytes()
    rec = recorder(tmp_path)
    await rec.open()
    [problem] = rec.problems
    assert isinstance(problem, RecordingCorrupt)
    assert problem.file == path and problem.seq == bad
    assert rec.current_file != path
    await rec.append("error", reason="still recording")
    await rec.close()
    assert path.read_bytes() == before
    assert not path.with_name(path.name + ".broken").exists()
    old, new = list_recordings(tmp_path / "rec")
    assert old == path
    reset = records_of(new)[0]
    assert reset["kind"] == "recorder.chain_reset"
    assert reset["bad_file"] == path.name and reset["bad_seq"] == bad
    assert reset["prev"] == "0" * 64
    assert reset["seq"] == records_of(path)[-1]["seq"] + 1
    results = verify([tmp_path / "rec"])
    assert [(r.state, r.first_bad_seq) for r in results] == [("tampered", bad), ("verified", None)]
    # Reopening again keeps appending to the new file and still leaves the bad one alone.
    rec = recorder(tmp_path)
    await rec.open()
    await rec.close()
    assert path.read_bytes() == before
    assert len(list_recordings(tmp_path / "rec")) == 2


@pytest.mark.asyncio
async def test_a_crash_without_close_resumes_and_seals_the_old_records(tmp_path: Path) -> None:
    rec = recorder(tmp_path, checkpoint_every=1000, checkpoint_seconds=3600)
    await rec.open()
    await record_session(rec, requests=2, end=False)
    path = rec.current_file
    assert path is not None
    # Simulate a crash: abandon the recorder without close().
    await rec._housekeeper.stop()
    rec._disk.close()
    rec._shutdown_executors()
    assert verify([path])[0].state == "unsigned"
    rec = recorder(tmp_path)
    await rec.open()
    await rec.append("session.end", session="s1")
    await rec.close()
    kinds = [r["kind"] for r in records_of(path)]
    assert "recorder.resumed" in kinds
    assert verify([path])[0].state == "verified"


@pytest.mark.asyncio
async def test_an_empty_newest_file_is_continued(tmp_path: Path) -> None:
    path = await _closed_recording(tmp_path)
    empty = path.with_name(path.name.replace("-000001", "-000002"))
    empty.write_bytes(b"")
    empty.chmod(0o600)
    rec = recorder(tmp_path)
    await rec.open()
    await rec.close()
    first = records_of(empty)[0]
    assert first["prev_file"] == path.name and first["seq"] == records_of(path)[-1]["seq"] + 1
    assert [r.state for r in verify([tmp_path / "rec"])] == ["verified", "verified"]
