"""Console parts without a proxy: the flow store, rendering, SSE parsing, the flow view."""

from __future__ import annotations

from typing import Any

import pytest
from rich.text import Text

from console.app import SluiceConsole
from console.approvals_ui import ApprovalPrompt, always_rule_text
from console.client import ConnChange, ConnState, EventStream, parse_sse_block
from console.model import Approvals, FlowStore
from console.render import (
    MASK_STYLE,
    decision_label,
    fit,
    highlight_body,
    layout,
    plain,
    row_cells,
    utc_clock,
)
from proxy.filter_language import parse_filter


def events(index: int, path: str = "/a", **done: Any) -> list[dict[str, Any]]:
    rid = f"r{index}"
    out: list[dict[str, Any]] = [
        {
            "type": "request.received",
            "seq": index * 3 + 1,
            "ts": 1000.0 + index,
            "request_id": rid,
            "method": "GET",
            "target": "api",
            "path": path,
            "query": "",
            "host": "h",
            "subject": "agent",
        },
    ]
    if done:
        out.append(
            {
                "type": "request.completed",
                "seq": index * 3 + 2,
                "ts": 1000.0 + index,
                "request_id": rid,
                **done,
            }
        )
    return out


def fill(store: FlowStore, *batches: list[dict[str, Any]]) -> None:
    for batch in batches:
        for event in batch:
            store.apply(event)


# -- the store ------------------------------------------------------------------------------


def test_store_folds_like_the_flow_table() -> None:
    store = FlowStore()
    fill(store, events(1, status=200, decision="allowed", bytes_out=10))
    flow = store.get("r1")
    assert flow is not None
    assert (flow.state, flow.status, flow.decision, flow.seq) == ("completed", 200, "allowed", 5)
    assert flow.get("missing", "x") == "x"
    assert store.apply({"type": "proxy.started", "seq": 9}) is None


def test_store_is_bounded_and_the_view_follows() -> None:
    store = FlowStore(max_flows=3)
    fill(store, *[events(i) for i in range(10)])
    assert len(store) == 3 and store.visible_count == 3
    assert [store.visible(i).request_id for i in range(3)] == ["r7", "r8", "r9"]
    assert store.get("r0") is None and store.dropped_total == 7 and store.seen_total == 10


def test_filter_tracks_flows_as_they_change() -> None:
    store = FlowStore()
    fill(store, events(1), events(2))
    store.set_filter(parse_filter("status:5xx"))
    store.finish_filter()
    assert store.visible_count == 0
    fill(store, events(2, status=502, decision="allowed"))  # r2 now matches
    assert [store.visible(i).request_id for i in range(store.visible_count)] == ["r2"]
    fill(store, events(1, status=500, decision="allowed"))  # an older flow slots in before
    assert [store.visible(i).request_id for i in range(2)] == ["r1", "r2"]
    store.set_filter(None)
    store.finish_filter()
    assert store.visible_count == 2


def test_filter_rebuild_runs_in_steps_and_counts_denials() -> None:
    store = FlowStore()
    for i in range(25):
        denied = i % 5 == 0
        fill(
            store,
            events(i, status=403 if denied else 200, decision="denied" if denied else "allowed"),
        )
    assert store.denied_total == 5
    store.set_filter(parse_filter("decision:denied"))
    assert not store.step(10) and store.rebuilding
    fill(store, events(3, status=403, decision="denied"))  # already passed by the rebuild
    fill(store, events(30, status=403, decision="denied"))  # not reached yet
    while not store.step(10):
        pass
    ids = [store.visible(i).request_id for i in range(store.visible_count)]
    assert ids == ["r0", "r3", "r5", "r10", "r15", "r20", "r30"]


def test_snapshot_merge_keeps_newer_facts() -> None:
    store = FlowStore()
    fill(store, events(1, status=200, decision="allowed"))
    store.merge_snapshot(
        [
            {"request_id": "r1", "seq": 1, "status": 999},  # older than what we hold
            {"request_id": "r9", "seq": 50, "method": "PUT", "path": "/x", "state": "completed"},
        ]
    )
    assert store.get("r1").status == 200  # type: ignore[union-attr]
    assert store.get("r9").method == "PUT"  # type: ignore[union-attr]


def test_approvals_book() -> None:
    book = Approvals()
    book.apply({"type": "approval.requested", "id": "a1", "created": 1})
    book.apply({"type": "approval.requested", "id": "a2", "created": 2})
    assert book.oldest()["id"] == "a1"  # type: ignore[index]
    assert book.apply({"type": "approval.decided", "id": "a1", "decided_by": "bob"}) == "decided"
    assert list(book.pending) == ["a2"] and book.closed["a1"]["decided_by"] == "bob"
    book.apply({"type": "approval.requested", "id": "a1"})  # a late replay: stays closed
    assert list(book.pending) == ["a2"]


# -- rendering --------------------------------------------------------------------------------


def test_highlight_body_marks_masked_regions_exactly() -> None:
    body = '{"note": "é", "token": "ghp_************", "n": 1}'.encode()
    start = body.index(b"ghp_")
    spans = [{"start": start, "end": start + 16, "rule": "github", "fingerprint": "ab"}]
    text = highlight_body(body, spans)
    masked = [span for span in text.spans if span.style == MASK_STYLE]
    assert len(masked) == 1
    assert text.plain[masked[0].start : masked[0].end] == "ghp_************"
    assert len([span for span in text.spans if span.style != MASK_STYLE]) > 3  # JSON colours
    plain_text = highlight_body(b"token=abc\x1b[31m\tend", [{"start": 6, "end": 9}])
    assert "\x1b" not in plain_text.plain and "\t" not in plain_text.plain
    assert plain_text.plain[6:9] == "abc"


def test_untrusted_text_is_never_markup() -> None:
    assert plain("a\x1b[2Jb\nc") == "a\ufffd[2Jb\ufffdc"
    assert fit("/[/admin]/[bold]x", 30).rstrip() == "/[/admin]/[bold]x"
    assert fit("abcdefgh", 5) == "abcd…" and fit("日本語テキスト", 6) == "日本… "
    rule = always_rule_text({"method": "POST", "target": "t", "path": "/[b]x", "query": ""})
    assert isinstance(rule, Text) and "path=/[b]x query=(none)" in rule.plain


@pytest.mark.parametrize(
    ("flow", "label"),
    [
        ({"decision": "allowed", "masked": 3}, "masked 3"),
        ({"decision": "denied", "rule": "no-env"}, "denied no-env"),
        ({"decision": "denied", "decided_by": "bob"}, "denied by bob"),
        ({"decision": "approved", "reason": "approved by alice"}, "approved by alice"),
        ({"decision": "held", "state": "held"}, "held for approval"),
        ({"state": "received"}, "received"),
        ({"decision": "refused", "code": "body_timeout"}, "refused body_timeout"),
    ],
)
def test_decision_labels(flow: dict[str, Any], label: str) -> None:
    assert decision_label(flow)[0] == label


def test_columns_fill_the_width() -> None:
    for width in (80, 120, 200):
        columns = layout(width)
        assert sum(c.width for c in columns) + len(columns) - 1 == width
    cells = row_cells({"started": 0, "path": "/p", "query": "a=1", "bytes_out": 2048}, utc_clock)
    assert cells["time"][0] == "00:00:00" and cells["path"][0] == "/p?a=1"
    assert cells["size"][0] == "2.0K"


# -- the event stream -------------------------------------------------------------------------


def test_sse_blocks() -> None:
    assert parse_sse_block(b'id: 4\nevent: request.received\ndata: {"seq": 4}') == (
        "request.received",
        {"seq": 4},
    )
    assert parse_sse_block(b": keep-alive") == (None, {})
    assert parse_sse_block(b"event: x\ndata: not json") == (None, {})


def test_stream_control_events() -> None:
    got: list[list[dict[str, Any]]] = []
    states: list[ConnChange] = []
    gaps: list[bool] = []
    stream = EventStream(
        None,  # type: ignore[arg-type]
        got.append,
        states.append,
        lambda: gaps.append(True),
        None,
        (0.1, 1.0),
    )
    blocks = [
        b'event: stream.gap\ndata: {"since": 3, "seq": null}',
        b'id: 7\nevent: request.received\ndata: {"seq": 7, "type": "request.received"}',
        b'event: stream.ready\ndata: {"last_seq": 7}',
    ]
    assert stream._deliver(blocks)
    assert gaps == [True] and stream.last_seq == 7 and got[0][0]["seq"] == 7
    assert states[-1].state is ConnState.CONNECTED
    assert not stream._deliver([b'event: stream.dropped\ndata: {"last_seq": 7}'])


# -- the app, fed directly --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_follow_selection_and_bounds() -> None:
    app = SluiceConsole(max_flows=50, row_clock=utc_clock)
    async with app.run_test(size=(120, 30)) as pilot:
        app.feed([e for i in range(80) for e in events(i, status=200, decision="allowed")])
        await pilot.pause(0.15)
        view = app.view
        assert len(app.store) == 50 and view.follow
        assert view.selected is not None and view.selected.request_id == "r79"
        await pilot.press("up", "up")
        assert not view.follow and view.selected.request_id == "r77"
        app.feed(events(80, status=200, decision="allowed"))
        await pilot.pause(0.15)
        assert view.selected.request_id == "r77"  # new flows do not move the selection
        await pilot.press("end")
        assert view.follow and view.selected.request_id == "r80"
        titles = [command.title for command in app.get_system_commands(app.screen)]
        assert {"Filter flows", "Review approvals", "Toggle details", "Keys"} <= set(titles)
        app.feed([{"type": "config.reload_failed", "error": "line 3: [bold]bad key"}])
        await pilot.pause(0.15)
        header = str(app.query_one("#header").render())
        assert "RELOAD REJECTED" in header and "line 3: [bold]bad key" in header
        app.feed([{"type": "config.reloaded", "rules": 4, "needs_restart": []}])
        await pilot.pause(0.15)
        assert "reloaded: 4 rules" in str(app.query_one("#header").render())
        await pilot.press("question_mark")
        await pilot.pause(0.05)
        assert app.screen.__class__.__name__ == "HelpScreen"
        await pilot.press("escape")


@pytest.mark.asyncio
async def test_prompt_guard_and_offline_verdict() -> None:
    app = SluiceConsole(row_clock=utc_clock)
    async with app.run_test(size=(120, 40)) as pilot:
        app.set_connection(ConnChange(ConnState.CONNECTED))
        app.feed(
            [
                {
                    "type": "approval.requested",
                    "id": "ap-1",
                    "request_id": "r1",
                    "method": "POST",
                    "target": "api",
                    "path": "/[/admin]/[bold]x",
                    "subject": "agent",
                    "rule": "r",
                    "reason": "[red]why",
                    "preview": "[/]",
                    "deadline": 9e9,
                },
            ]
        )
        await pilot.pause(0.15)
        prompt = app.screen
        assert isinstance(prompt, ApprovalPrompt)
        await pilot.press("A", "s", "a")
        assert app.screen is prompt and not app.verdicts
        prompt.opened_at -= 1.0  # past the guard
        await pilot.press("A")
        await pilot.pause(0.05)
        assert [(v.decision, v.scope) for v in app.verdicts] == [("approve", "always")]
