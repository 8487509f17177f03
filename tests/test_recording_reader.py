"""The reader: cached index, random access, time seeks, sessions, flows, HAR export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_recording_support import MASKED, only_file, record_session, recorder, records_of

from proxy.masking.engine import Span
from proxy.recording import Recording
from proxy.recording.cli import run_export_har, run_sessions
from proxy.recording.index import open_index


async def _two_sessions(tmp_path: Path, **options: object) -> Path:
    rec = recorder(tmp_path, **options)  # type: ignore[arg-type]
    await rec.open()
    await record_session(rec, "s1", requests=6, subject="alice")
    await record_session(rec, "s2", requests=2, subject="bob", end=False)
    await rec.append("error", request_id="s2-r0", reason="upstream reset")
    await rec.close()
    return tmp_path / "rec"


@pytest.mark.asyncio
async def test_the_index_is_built_once_cached_and_extended_when_the_file_grows(
    tmp_path: Path,
) -> None:
    directory = await _two_sessions(tmp_path)
    path = only_file(directory)
    idx = path.with_name(path.name + ".idx")
    assert not idx.exists()
    first = open_index(path)
    assert first.source == "built" and idx.exists()
    assert oct(idx.stat().st_mode & 0o777) == "0o600"
    again = open_index(path)
    assert again.source == "cache"
    assert list(again.offsets) == list(first.offsets)
    assert again.sessions == first.sessions and again.counts == first.counts
    count = len(first)
    rec = recorder(tmp_path)
    await rec.open()
    await rec.append("error", reason="more")
    await rec.close()
    grown = open_index(path)
    assert grown.source == "extended" and len(grown) == count + 3  # resumed, error, checkpoint
    with Recording.open(directory) as recording:
        assert recording.get(grown.seqs[-1])["kind"] == "checkpoint"
        assert recording.counts["errors"] == 2
    # Rewritten in place (same size, new mtime): rebuilt, never trusted.
    data = bytearray(path.read_bytes())
    os.utime(path, ns=(1, 1))
    path.write_bytes(bytes(data))
    assert open_index(path).source == "built"
    assert open_index(path, cache=False).source == "built"


@pytest.mark.asyncio
async def test_get_iter_range_and_seek_time(tmp_path: Path) -> None:
    directory = await _two_sessions(tmp_path, rotate_bytes=3000)
    with Recording.open(directory) as recording:
        assert len(recording.files) > 1
        all_records = [r for path in recording.files for r in records_of(path)]
        assert len(recording) == len(all_records)
        assert recording.first_seq == 1 and recording.last_seq == len(all_records)
        for record in all_records[::7]:
            assert recording.get(record["seq"]) == record
        with pytest.raises(KeyError):
            recording.get(10_000)
        middle = [r["seq"] for r in recording.iter_range(10, 20)]
        assert middle == list(range(10, 21))
        assert [r["seq"] for r in recording.iter_range(len(all_records) - 1)] == [
            len(all_records) - 1,
            len(all_records),
        ]
        target = all_records[25]
        found = recording.seek_time(target["ts"])
        assert found is not None and found <= target["seq"]
        assert recording.get(found)["ts"] >= target["ts"] - 1e-6
        assert all(r["ts"] < target["ts"] for r in all_records if r["seq"] < found)
        assert recording.seek_time(0) == 1
        assert recording.seek_time(all_records[-1]["ts"] + 10) is None


@pytest.mark.asyncio
async def test_sessions_are_summarised_with_their_counts(tmp_path: Path) -> None:
    directory = await _two_sessions(tmp_path, rotate_bytes=3000)
    with Recording.open(directory) as recording:
        s1, s2 = recording.sessions()
    assert (s1.id, s1.subject, s1.requests) == ("s1", "alice", 6)
    assert (s1.denied, s1.held, s1.masked, s1.errors) == (2, 2, 2, 0)
    assert s1.ended and s1.duration == pytest.approx(s1.end - s1.start) and s1.duration > 0
    assert len(s1.files) > 1  # the session spans a rotation
    assert (s2.id, s2.subject, s2.requests) == ("s2", "bob", 2)
    assert (s2.denied, s2.held, s2.masked, s2.errors) == (1, 0, 1, 1)
    assert not s2.ended


@pytest.mark.asyncio
async def test_flows_group_each_request_with_its_decisions_and_response(tmp_path: Path) -> None:
    directory = await _two_sessions(tmp_path)
    with Recording.open(directory) as recording:
        flows = recording.flows("s1")
        assert [f.request_id for f in flows] == [f"s1-r{n}" for n in range(6)]
        denied, held = flows[1], flows[2]
        assert denied.response is None and [d["action"] for d in denied.decisions] == ["denied"]
        assert [d["action"] for d in held.decisions] == ["held", "approved"]
        assert held.decisions[1]["approver"] == "grace"
        assert flows[0].response is not None and flows[0].response["session"] == "s1"
        assert recording.body(flows[0], "response") == MASKED
        assert flows[0].response["mask_spans"][0]["rule"] == "github-pat"
        assert recording.flows("nobody") == []


@pytest.mark.asyncio
async def test_mask_spans_are_recorded_from_span_objects(tmp_path: Path) -> None:
    rec = recorder(tmp_path)
    await rec.open()
    spans = [Span(3, 10, "aws-key", "0123456789abcdef")]
    await rec.append("response", request_id="r", status=200, body="ab*******", mask_spans=spans)
    await rec.close()
    response = records_of(only_file(tmp_path / "rec"))[1]
    assert response["mask_spans"] == [spans[0].as_dict()]


@pytest.mark.asyncio
async def test_har_export_opens_as_har_1_2_with_the_masked_body(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = await _two_sessions(tmp_path)
    rec = recorder(tmp_path)
    await rec.open()
    await rec.append("request", request_id="bin", session="s3", method="GET", url="http://x/b")
    await rec.append(
        "response",
        request_id="bin",
        status=200,
        body=b"\x89PNG\x00\xff",
        headers={"Content-Type": "image/png"},
    )
    await rec.close()
    out = tmp_path / "s1.har"
    assert run_export_har(str(directory), str(out), session="s1") == 0
    har = json.loads(out.read_text())
    log = har["log"]
    assert log["version"] == "1.2" and log["creator"]["name"] == "sluice"
    assert len(log["entries"]) == 6
    first = log["entries"][0]
    for key in ("startedDateTime", "time", "request", "response", "cache", "timings"):
        assert key in first
    assert first["request"]["method"] == "POST"
    assert first["request"]["url"].startswith("https://api.github.com/")
    assert {"name": "page", "value": "0"} in first["request"]["queryString"]
    assert first["request"]["postData"]["text"] == '{"title": "hello"}'
    assert {"name": "Authorization", "value": "[REDACTED]"} in first["request"]["headers"]
    assert first["response"]["status"] == 200 and first["response"]["statusText"] == "OK"
    assert first["response"]["content"]["text"] == MASKED.decode()
    assert first["response"]["content"]["mimeType"] == "application/json"
    assert first["_sluice"]["mask_spans"][0]["rule"] == "github-pat"
    assert log["entries"][1]["response"]["status"] == 0  # denied: no response recorded
    assert log["entries"][1]["_sluice"]["decisions"][0]["action"] == "denied"
    assert run_export_har(str(directory), "-", request_id="bin") == 0
    single = json.loads(capsys.readouterr().out)
    content = single["log"]["entries"][0]["response"]["content"]
    assert content["encoding"] == "base64" and content["text"] == "iVBORwD/"
    everything = tmp_path / "all.har"
    assert run_export_har(str(directory), str(everything)) == 0
    assert len(json.loads(everything.read_text())["log"]["entries"]) == 9
    assert run_export_har(str(directory), str(out), session="nobody") == 1
    assert run_export_har(str(tmp_path / "missing"), str(out)) == 2


@pytest.mark.asyncio
async def test_sessions_command_lists_counts_and_integrity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = await _two_sessions(tmp_path)
    assert run_sessions(str(directory), as_json=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["id"], r["requests"], r["denied"], r["held"], r["masked"]) for r in rows] == [
        ("s1", 6, 2, 2, 2),
        ("s2", 2, 1, 0, 1),
    ]
    assert {r["integrity"] for r in rows} == {"verified"}
    assert run_sessions(str(directory), as_json=False) == 0
    table = capsys.readouterr().out
    assert "SESSION" in table and "alice" in table and "verified" in table
    path = only_file(directory)
    data = path.read_bytes()
    assert b"hello" in data
    path.write_bytes(data.replace(b"hello", b"hellO", 1))
    assert run_sessions(str(directory), as_json=True) == 0
    assert {r["integrity"] for r in json.loads(capsys.readouterr().out)} == {"tampered"}
    assert run_sessions(str(tmp_path / "missing"), as_json=False) == 2


@pytest.mark.asyncio
async def test_refresh_follows_a_live_recording_across_rotation(tmp_path: Path) -> None:
    rec = recorder(tmp_path, rotate_bytes=2000)
    await rec.open()
    await record_session(rec, "s1", requests=1)
    with Recording.open(tmp_path / "rec") as recording:
        before = len(recording)
        await record_session(rec, "s2", requests=4)
        assert len(recording) == before
        recording.refresh()
        assert len(recording) > before and len(recording.files) > 1
        assert [s.id for s in recording.sessions()] == ["s1", "s2"]
        assert recording.get(recording.last_seq or 0)["seq"] == recording.last_seq
    await rec.close()


@pytest.mark.asyncio
async def test_an_unreadable_record_is_reported_not_guessed(tmp_path: Path) -> None:
    from proxy.recording import RecordingCorrupt

    directory = await _two_sessions(tmp_path)
    path = only_file(directory)
    lines = path.read_bytes().splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if b'"kind":"request"' in line)
    lines[n] = lines[n][:-3] + b"\n"  # the head survives, the JSON does not
    path.write_bytes(b"".join(lines))
    with Recording.open(directory) as recording, pytest.raises(RecordingCorrupt) as caught:
        recording.get(n + 1)
    assert caught.value.seq == n + 1


@pytest.mark.asyncio
async def test_decisions_read_the_same_from_request_records_and_decision_records(
    tmp_path: Path,
) -> None:
    """Current files carry a request's first decision in its request record; older ones
    have a separate decision record. Counts, flows and HAR read both alike."""
    rec = recorder(tmp_path)
    await rec.open()
    await rec.append("session.start", session="new", subject="a", groups=[], token_id=None)
    await rec.append("session.start", session="old", subject="a", groups=[], token_id=None)
    for session in ("new", "old"):
        for n, action in enumerate(("allowed", "denied", "held")):
            request_id = f"{session}-{n}"
            decision = {"action": action, "rule": f"rule-{n}", "reason": "why", "code": action}
            fields = {"request_id": request_id, "session": session, "method": "GET"}
            fields["url"] = f"/api/{n}"
            if session == "new":
                await rec.append("request", **fields, **decision)
            else:
                await rec.append("request", **fields)
                await rec.append("decision", request_id=request_id, **decision)
            if action == "held":
                await rec.append("decision", request_id=request_id, action="denied", rule="p")
            await rec.append("response", request_id=request_id, status=403 if n else 200)
    await rec.close()
    with Recording.open(tmp_path / "rec") as recording:
        summaries = {s.id: s for s in recording.sessions()}
        for session in ("new", "old"):
            summary = summaries[session]
            assert (summary.requests, summary.denied, summary.held) == (3, 2, 1), summary
            flows = {flow.request_id: flow for flow in recording.flows(session)}
            decided = {
                request_id: [(d["kind"], d["action"], d.get("rule")) for d in flow.decisions]
                for request_id, flow in flows.items()
            }
            assert decided == {
                f"{session}-0": [("decision", "allowed", "rule-0")],
                f"{session}-1": [("decision", "denied", "rule-1")],
                f"{session}-2": [("decision", "held", "rule-2"), ("decision", "denied", "p")],
            }
    new = [r for r in records_of(only_file(tmp_path / "rec")) if r.get("session") == "new"]
    assert "decision" not in [r["kind"] for r in new if r.get("request_id") != "new-2"]
    out = tmp_path / "out.har"
    assert run_export_har(str(tmp_path / "rec"), str(out)) == 0
    entries = json.loads(out.read_text())["log"]["entries"]
    actions = {
        e["_sluice"]["request_id"]: [d["action"] for d in e["_sluice"]["decisions"]]
        for e in entries
    }
    assert actions["new-2"] == actions["old-2"] == ["held", "denied"]
    assert actions["new-1"] == actions["old-1"] == ["denied"]


@pytest.mark.asyncio
async def test_refresh_keeps_the_indexes_of_files_that_did_not_change(tmp_path: Path) -> None:
    rec = recorder(tmp_path, rotate_bytes=2048)
    await rec.open()
    await record_session(rec, "s1", requests=6)
    await rec.flush()
    recording = Recording.open(tmp_path / "rec")
    try:
        before = {index.path: index for index in recording.indexes}
        assert len(before) >= 2
        await rec.append("session.start", session="s2", subject="bob", groups=[], token_id=None)
        await rec.append("request", request_id="late", session="s2", method="GET", action="allowed")
        recording.refresh()
        after = {index.path: index for index in recording.indexes}
        changed = [path for path in after if after[path] is not before.get(path)]
        assert changed == [rec.current_file]  # only the file that grew was read again
        flow = recording.flow("late")
        assert flow is not None and [d["action"] for d in flow.decisions] == ["allowed"]
    finally:
        recording.close()
        await rec.close()
