"""Gaps in what the proxy records, found while building the replay view (not fixed here).

Each test states what a replay needs from a real proxy's recording and fails today;
``strict`` makes the suite say so when the product is fixed.
"""

from __future__ import annotations

import json

from test_replay_support import demo_run, incident_run, records_of

from proxy.recording import Recording


def test_the_session_summary_counts_the_held_request() -> None:
    with Recording.open(demo_run().recordings) as recording:
        (session,) = recording.sessions()
        kinds = [r["kind"] for r in recording.session_records(session.id)]
        assert kinds.count("approval.requested") == 1  # the demo's push to main was held
        assert session.held == 1
        assert recording.counts["held"] == 1


def test_a_forwarded_request_body_is_in_the_recording() -> None:
    with Recording.open(incident_run().recordings) as recording:
        (session,) = recording.sessions()
        flow = next(
            f
            for f in recording.flows(session.id)
            if f.request is not None and f.request.get("url") == "/items"
        )
        assert flow.request is not None and flow.request.get("method") == "POST"
        assert recording.body(flow, "request") == b'{"name": "x"}'


def test_an_upstream_failure_is_recorded_as_the_agent_received_it() -> None:
    run = incident_run()
    status, received = run.received["/down/anything"]
    assert status == 502 and json.loads(received)["error"] == "upstream_unreachable"
    responses = [r for r in records_of(run.recordings) if r["kind"] == "response"]
    recorded = next(r for r in responses if r["status"] == 502)
    assert recorded["body"].get("text", "").encode() == received
