"""The replay model without a terminal: timeline, folding, playhead, search, seek, what-if.

All on recordings written by a real proxy (``test_replay_support``).
"""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.text import Text
from test_replay_support import demo_run, flipped_config, incident_run, tampered_copy, url_seq

from console.render import decision_label
from console.replay_detail import describe_replay
from console.replay_find import parse_seek, search_flows
from console.replay_model import ReplayStore, Timeline, integrity_of
from console.replay_whatif import what_if
from proxy.config import load_config
from proxy.recording import Recording, verify


def open_timeline(directory: Path) -> tuple[Recording, Timeline]:
    recording = Recording.open(directory)
    (session,) = recording.sessions()
    return recording, Timeline.build(session.id, recording.session_records(session.id))


def test_the_demo_session_folds_into_the_flows_the_proxy_reported() -> None:
    recording, timeline = open_timeline(demo_run().recordings)
    assert timeline.info.subject == "demo-agent" and timeline.info.groups == ("agents",)
    store = ReplayStore(timeline)
    store.move_to(len(timeline) - 1)
    rows = [
        (f.method, f.path, f.status, decision_label(f)[0])
        for f in (store.visible(i) for i in range(store.visible_count))
    ]
    assert rows[0] == ("GET", "/api/tree", 200, "allowed")
    assert ("GET", "/api/files/.env", 403, "denied credential-files") in rows
    assert ("POST", "/api/push", 403, "denied by local-operator") in rows
    assert ("GET", "/api/builds/42/log", 200, "masked 1") in rows
    assert ("DELETE", "/api/branches/main", 403, "denied") in rows
    assert len(rows) == 11
    counts = {name: len(marks) for name, marks in timeline.marks.items()}
    assert counts == {"denied": 5, "held": 1, "masked": 1, "failed": 0}
    recording.close()


def test_the_playhead_shows_each_flow_as_it_stood_then() -> None:
    recording, timeline = open_timeline(demo_run().recordings)
    store = ReplayStore(timeline)
    assert store.visible_count == 0
    held = timeline.marks["held"][0]
    store.move_to(held)
    flow = store.current_flow()
    assert flow is not None and flow.state == "held" and flow.status is None
    assert decision_label(flow)[0] == "held for approval"
    store.move_to(len(timeline) - 1)
    assert decision_label(flow)[0] == "denied by local-operator"
    store.move_to(timeline.first_pos(flow.request_id) - 1)  # just before its request
    assert not flow.shown and store.visible_count == 4
    recording.close()


def test_stepping_and_jumping_agree_at_every_position() -> None:
    """Moving one event at a time, backwards, or straight there gives the same flows."""
    recording, timeline = open_timeline(demo_run().recordings)
    stepped, jumped, back = ReplayStore(timeline), ReplayStore(timeline), ReplayStore(timeline)
    back.move_to(len(timeline) - 1)
    for position in range(-1, len(timeline)):
        stepped.move_to(position)
        jumped.move_to(-1)
        jumped.move_to(position)
        mirror = len(timeline) - 2 - position
        back.move_to(mirror)
        fresh = ReplayStore(timeline)
        fresh.move_to(mirror)
        assert [f.as_dict() for f in _shown(stepped)] == [f.as_dict() for f in _shown(jumped)]
        assert [f.as_dict() for f in _shown(back)] == [f.as_dict() for f in _shown(fresh)]
    recording.close()


def _shown(store: ReplayStore) -> list:  # type: ignore[type-arg]
    return [store.visible(i) for i in range(store.visible_count)]


def test_jumps_find_failed_and_masked_events_of_a_real_proxy() -> None:
    recording, timeline = open_timeline(incident_run().recordings)
    failed = [timeline.events[p] for p in timeline.marks["failed"]]
    assert [e.data["status"] for e in failed] == [500, 502, 502]
    first = timeline.next_mark("failed", -1, 1)
    assert first == timeline.marks["failed"][0]
    assert timeline.next_mark("failed", first, 1) == timeline.marks["failed"][1]
    assert timeline.next_mark("failed", first, -1) is None
    masked = timeline.next_mark("masked", -1, 1)
    assert masked is not None and timeline.events[masked].data["mask_spans"]
    store = ReplayStore(timeline)
    store.move_to(len(timeline) - 1)
    boom = next(f for f in _shown(store) if f.path == "/boom")
    assert (boom.state, decision_label(boom)[0]) == ("failed", "failed")
    assert store.tally()["failed"] == 3
    recording.close()


def test_search_finds_bodies_and_headers_in_any_case() -> None:
    recording, timeline = open_timeline(demo_run().recordings)
    by_path = {
        rid: next(e.data["url"] for e in timeline.flow_events(rid) if e.kind == "request")
        for rid in timeline.by_flow
    }

    def paths(needle: str) -> set[str]:
        return {by_path[rid] for rid in search_flows(recording, timeline, needle)}

    assert paths("FIX TYPO IN MODULE") == {"/api/push"}  # a request body
    assert paths("GITHUB_TOKEN") == {"/api/builds/42/log"}  # a (masked) response body
    assert paths("ghp_****") == {"/api/builds/42/log"}
    # a response header: every flow, the held-then-denied one included (its 403 is recorded)
    assert len(search_flows(recording, timeline, "x-sluice-request-id")) == 11
    assert paths("no such text anywhere") == set()
    recording.close()


def test_seek_understands_offsets_clock_times_and_seqs() -> None:
    recording, timeline = open_timeline(demo_run().recordings)
    start = timeline.start
    assert parse_seek("+0", timeline) == 0
    assert parse_seek("+1h", timeline) == len(timeline) - 1
    assert parse_seek("seq 17", timeline) == timeline.pos_of_seq(17)
    assert timeline.events[parse_seek("#17", timeline)].seq == 17
    clock = dt.datetime.fromtimestamp(start + 0.2, dt.UTC).strftime("%H:%M:%S.%f")
    assert parse_seek(clock, timeline, utc=True) == timeline.at_time(start + 0.2)
    assert parse_seek(str(start - 10), timeline) == -1
    for bad in ("", "soon", "+1 fortnight", "seq x"):
        with pytest.raises(ValueError):
            parse_seek(bad, timeline)
    recording.close()


def test_integrity_marks_flows_after_the_tampered_seq(tmp_path: Path) -> None:
    run = demo_run()
    seq = url_seq(run.recordings, "/api/builds/latest")
    copy = tampered_copy(run.recordings, tmp_path / "bad", seq, b"User-Agent")
    integrity = integrity_of(verify([copy]))
    assert (integrity.state, integrity.untrusted_from) == ("tampered", seq)
    recording, timeline = open_timeline(copy)
    store = ReplayStore(timeline)
    store.untrusted_from = integrity.untrusted_from
    store.move_to(len(timeline) - 1)
    marked = {f.path: store.untrusted(f) for f in _shown(store)}
    assert marked["/api/builds/latest"] and marked["/api/branches/main"]
    assert not marked["/api/tree"] and not marked["/api/push"]
    recording.close()


def test_what_if_with_the_recording_config_changes_nothing() -> None:
    run = demo_run()
    recording, timeline = open_timeline(run.recordings)
    rows = what_if(recording, timeline, load_config(run.config))
    assert len(rows) == 11
    assert [r for r in rows if r.changed or r.rule_changed] == []
    held = next(r for r in rows if r.recorded == "approve")
    assert (held.shown_would, held.would_rule) == ("hold", "push-to-main")
    exfil = next(r for r in rows if r.recorded_rule == "no-exfiltration")
    assert exfil.would_rule == "no-exfiltration"  # the outbound secret scan ran
    recording.close()


def test_what_if_with_a_flipped_rule_lists_the_changed_decisions_first(tmp_path: Path) -> None:
    run = demo_run()
    config = load_config(flipped_config(run.config, tmp_path / "open.toml"))
    recording, timeline = open_timeline(run.recordings)
    rows = what_if(recording, timeline, config)
    changed = [(r.path, r.recorded, r.would, r.would_rule) for r in rows if r.changed]
    assert changed == [
        ("/api/files/.env", "deny", "allow", "repo-read"),
        ("/api/files/keys/deploy_key.pem", "deny", "allow", "repo-read"),
    ]
    assert [r.changed for r in rows[:3]] == [True, True, False]
    recording.close()


def test_the_detail_hides_secrets_the_agent_sent() -> None:
    recording, timeline = open_timeline(demo_run().recordings)
    store = ReplayStore(timeline)
    store.move_to(len(timeline) - 1)
    flow = next(f for f in _shown(store) if f.get("rule") == "no-exfiltration")
    recorded = recording.body(recording.flow(flow.request_id), "request")  # type: ignore[arg-type]
    token = re.search(rb"npm_[A-Za-z0-9]{36}", recorded)
    assert token is not None  # the recording keeps what the agent sent
    items = describe_replay(flow, store, recording)
    text = "\n".join(item.plain for item in items if isinstance(item, Text))
    assert token.group().decode() not in text
    assert "1 secret(s) the agent sent (npm-token)" in text
    assert '"NPM_TOKEN": "' + "*" * 40 + '"' in text
    recording.close()


def test_replay_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["replay", str(tmp_path / "missing")], ["replay"]):
        result = subprocess.run(
            [sys.executable, "-m", "console", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 2, result
        assert "sluice replay" in result.stderr or "usage: sluice" in result.stderr
