"""Snapshots of the console (pytest-textual-snapshot): deterministic, no clocks or ports.

Flows are fed from a fixed list; times are drawn in UTC from fixed timestamps; the
approval countdown reads a fixed clock. Textual is pinned exactly by the lock file, since
a Textual release that draws differently changes every snapshot. After an intended change
of the UI, review and accept with ``pytest tests/test_console_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from typing import Any

from textual.pilot import Pilot

from console.app import SluiceConsole
from console.client import ConnChange, ConnState
from console.flow_detail import BodyView, FlowDetail
from console.model import Flow
from console.render import utc_clock

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
NOW = T0 + 120
SIZE = (130, 38)
HEALTH = {
    "status": "ok",
    "version": "0.1.0",
    "uptime_s": 3725,
    "identity": "none",
    "config": {"path": "sluice.toml", "digest": "abc", "reloads": 2, "last_error": None},
    "principal": "local-operator",
    "in_flight": 1,
}
SECRET_BODY = (
    b'{"name": "deploy-key", "token": "ghp_************************************",\n'
    b' "note": "rotated", "aws": "AKIA****************"}'
)
_GH, _AWS = SECRET_BODY.index(b"ghp_"), SECRET_BODY.index(b"AKIA")
SPANS = [
    {"start": _GH, "end": _GH + 40, "rule": "github-classic-token", "fingerprint": "f1e2d3c4b5a6"},
    {"start": _AWS, "end": _AWS + 20, "rule": "aws-access-key-id", "fingerprint": "0a1b2c3d4e5f"},
]


def flow_events(index: int, method: str, path: str, **done: Any) -> list[dict[str, Any]]:
    request_id = f"req{index:04d}"
    ts = T0 + index * 7
    events: list[dict[str, Any]] = [
        {
            "type": "request.received",
            "seq": index * 10 + 1,
            "ts": ts,
            "request_id": request_id,
            "method": method,
            "target": done.pop("target", "repo"),
            "path": path,
            "query": "",
            "host": "127.0.0.1:8700",
            "client": "127.0.0.1",
            "subject": done.pop("subject", "agent-7"),
            "session": "s-1",
            "groups": ["agents"],
        },
    ]
    if done:
        events.append(
            {
                "type": "request.completed",
                "seq": index * 10 + 2,
                "ts": ts,
                "request_id": request_id,
                **done,
            }
        )
    return events


FLOWS: list[dict[str, Any]] = [
    *flow_events(
        1,
        "GET",
        "/api/files/README.md",
        status=200,
        decision="allowed",
        rule="repo-read",
        bytes_out=2310,
        duration_ms=4.2,
    ),
    *flow_events(
        2,
        "GET",
        "/api/files/.env",
        status=403,
        decision="denied",
        rule="credential-files",
        reason="credential files are not for agents",
        bytes_out=160,
        duration_ms=0.8,
    ),
    *flow_events(
        3,
        "GET",
        "/api/secrets/deploy",
        status=200,
        decision="allowed",
        rule="repo-read",
        bytes_out=126,
        duration_ms=9.6,
        masked=2,
        mask_spans=SPANS,
    ),
    *flow_events(
        4,
        "POST",
        "/api/builds",
        target="build",
        status=201,
        decision="allowed",
        rule="build-trigger",
        bytes_out=88,
        duration_ms=31.0,
    ),
    *flow_events(
        5,
        "GET",
        "/[/admin]/[bold]x",
        status=404,
        decision="allowed",
        rule="repo-read",
        bytes_out=9,
        duration_ms=1.1,
    ),
    *flow_events(
        6,
        "POST",
        "/api/push",
        status=200,
        decision="approved",
        rule="push-to-main",
        reason="approved by alice",
        bytes_out=40,
        duration_ms=15200.0,
    ),
    *flow_events(
        7,
        "POST",
        "/api/push",
        status=403,
        decision="denied",
        rule="push-to-main",
        bytes_out=200,
        duration_ms=8000.0,
    ),
    {
        "type": "approval.decided",
        "seq": 75,
        "ts": T0 + 60,
        "id": "ap-1-7",
        "request_id": "req0007",
        "state": "denied",
        "decided_by": "bob",
        "decision_reason": "not on a Friday",
        "scope": "once",
        "method": "POST",
        "target": "repo",
        "path": "/api/push",
        "deadline": NOW,
    },
    *flow_events(8, "GET", "/api/slow"),
]
HELD = {
    "type": "approval.requested",
    "seq": 90,
    "ts": T0 + 100,
    "id": "ap-1-9",
    "request_id": "req0009",
    "session": "s-1",
    "subject": "agent-7",
    "method": "POST",
    "target": "repo",
    "path": "/api/push",
    "query": "",
    "rule": "push-to-main",
    "reason": "pushes to main need a human review",
    "preview": '{"branch": "main", "message": "[bold]ship it[/bold]", "token": "ghp_****"}',
    "deadline": NOW + 42,
    "state": "pending",
}


class SampleDetails:
    """A detail source as the admin API answers: the masked response the agent received."""

    async def detail(self, flow: Flow) -> FlowDetail:
        if flow.request_id != "req0003":
            return FlowDetail(unavailable="HTTP 404: the recording has no such request")
        return FlowDetail(
            request_headers=[("Host", "127.0.0.1:8700"), ("Authorization", "[REDACTED]")],
            response_headers=[("Content-Type", "application/json")],
            response_body=BodyView(SECRET_BODY, SPANS, len(SECRET_BODY)),
        )


def make_app() -> SluiceConsole:
    return SluiceConsole(
        row_clock=utc_clock,
        detail_clock=utc_clock,
        now=lambda: NOW,
        url="http://127.0.0.1:8701",
        detail_source=SampleDetails(),
    )


async def feed(pilot: Pilot[Any], events: list[dict[str, Any]]) -> None:
    app = pilot.app
    assert isinstance(app, SluiceConsole)
    app.set_connection(ConnChange(ConnState.CONNECTED))
    app.set_health(HEALTH)
    app.feed(events)
    await pilot.pause(0.2)


def test_live_view(snap_compare: Any) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot, FLOWS)

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_detail_pane_with_masked_regions(snap_compare: Any) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await feed(pilot, FLOWS)
        await pilot.press("up", "up", "up", "up", "up")  # to the flow with masked regions
        await pilot.pause(0.2)

    assert snap_compare(make_app(), terminal_size=(130, 44), run_before=run_before)


def test_approval_prompt(snap_compare: Any) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        held = {
            "type": "request.held",
            "seq": 89,
            "ts": T0 + 99,
            "request_id": "req0009",
            "decision": "held",
            "rule": "push-to-main",
            "code": "held",
        }
        await feed(pilot, [*FLOWS, *flow_events(9, "POST", "/api/push"), held, HELD])
        await pilot.pause(0.3)

    assert snap_compare(make_app(), terminal_size=(130, 44), run_before=run_before)
