"""One recorded session replayed: the live view's list and details, driven by a playhead.

The playhead is an event (a record) of the session. Stepping, jumping to the next
denied/held/masked/failed event, seeking and playing all move it; the list shows the
flows as they stood at that moment, and the detail pane the flow of that event. Playing
runs on a 50 ms timer that applies every event due since the last tick (one refresh per
tick), at the recorded pace times 1, 4 or 16.

Slow work (search over bodies, what-if, HAR export) runs in threads with their own
``Recording`` (the reader is not thread-safe); results come back with
``call_from_thread``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Input

from console.filterbar import FilterBar
from console.flowview import FlowView
from console.model import Flow
from console.render import plain
from console.replay_detail import ReplayDetail, describe_replay
from console.replay_model import (
    CATEGORIES,
    Integrity,
    ReplayStore,
    Timeline,
)
from console.replay_tools import ReplayTools
from console.replay_views import IntegrityBanner, ReplayFlowView, ReplayHeader, tally_text
from proxy.recording import Recording

if TYPE_CHECKING:
    from console.replay_app import ReplayApp

TICK = 0.05
SPEEDS = (1, 4, 16)
DIM = Style(dim=True)


def _jump(key: str, name: str, direction: int, show: bool) -> Binding:
    word = "Next" if direction > 0 else "Previous"
    return Binding(
        key,
        f"jump('{name}', {direction})",
        f"{word} {name}" if not show else name.capitalize(),
        show=show,
        id=f"replay.{'next' if direction > 0 else 'prev'}_{name}",
    )


class ReplayScreen(ReplayTools, Screen[None]):
    """The flow list, detail pane and playhead of one session (one screen per session)."""

    AUTO_FOCUS = "ReplayFlowView"  # never the filter: keys pressed early must not type there
    BINDINGS = [
        Binding("space", "play", "Play/pause", key_display="␣", id="replay.play"),
        Binding("x", "speed", "Speed", id="replay.speed"),
        _jump("d", "denied", 1, True),
        _jump("D", "denied", -1, False),
        _jump("h", "held", 1, True),
        _jump("H", "held", -1, False),
        _jump("m", "masked", 1, True),
        _jump("M", "masked", -1, False),
        _jump("f", "failed", 1, True),
        _jump("F", "failed", -1, False),
        Binding("g", "edge(-1)", "First event", show=False, id="replay.first"),
        Binding("G", "edge(1)", "Last event", show=False, id="replay.last"),
        Binding("t", "seek", "Seek", id="replay.seek"),
        Binding("s", "search", "Search", id="replay.search"),
        Binding("w", "what_if", "What-if", id="replay.what_if"),
        Binding("e", "export('session')", "HAR", id="replay.export_session"),
        Binding("E", "export('flow')", "HAR of flow", show=False, id="replay.export_flow"),
        Binding("r", "region(1)", "Next region", show=False, id="replay.next_region"),
        Binding("R", "region(-1)", "Previous region", show=False, id="replay.prev_region"),
        Binding("slash", "focus_filter", "Filter", key_display="/", id="replay.filter"),
        Binding("escape", "focus_list", "Back to list", show=False, id="replay.list"),
        Binding("i", "toggle_details", "Details", show=False, id="replay.details"),
        Binding("o", "app.sessions", "Sessions", show=False, id="replay.sessions"),
        Binding("v", "app.integrity", "Integrity", show=False, id="replay.integrity"),
        Binding("question_mark", "app.help", "Help", key_display="?", id="replay.help"),
        Binding("q", "app.quit", "Quit", id="replay.quit"),
    ]
    CSS = """
    ReplayScreen { layout: vertical; }
    ReplayScreen ReplayFlowView { height: 1fr; }
    ReplayScreen ReplayDetail { height: 2fr; }
    ReplayScreen #search { height: 3; border: tall $panel; display: none; }
    ReplayScreen #search.-shown { display: block; }
    """

    def __init__(self, timeline: Timeline, summary: Any, integrity: Integrity | None) -> None:
        super().__init__(id="replay")
        self.timeline = timeline
        self.summary = summary
        self.store = ReplayStore(timeline)
        self.integrity = integrity
        self.playing = False
        self.speed = 1
        self.mask_region = 0
        self.search_text = ""
        self._anchor = (0.0, 0.0)  # (monotonic when play started, recorded ts then)
        self._timer: Timer | None = None
        self._detail_for: str | None = None
        self.totals = {name: len(timeline.marks[name]) for name in CATEGORIES}

    @property
    def replay_app(self) -> ReplayApp:
        return self.app  # type: ignore[return-value]

    @property
    def recording(self) -> Recording:
        return self.replay_app.recording

    @property
    def view(self) -> ReplayFlowView:
        return self.query_one(ReplayFlowView)

    def compose(self) -> ComposeResult:
        yield ReplayHeader(id="replay-header")
        yield IntegrityBanner(id="banner")
        yield FilterBar(id="filterbar")
        yield Input(placeholder="search bodies and headers (Enter; empty clears)", id="search")
        yield ReplayFlowView(self.store, clock=self.replay_app.row_clock, id="flows")
        yield ReplayDetail(id="detail")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(ReplayDetail).clock = self.replay_app.detail_clock
        self._timer = self.set_interval(TICK, self._tick, pause=True)
        self.set_integrity(self.integrity)
        self.move_to(len(self.timeline) - 1)
        self.view.focus()

    # -- the playhead ----------------------------------------------------------------------

    def move_to(self, position: int, *, anchor: bool = True) -> None:
        self.store.move_to(position)
        if anchor and self.playing:
            self._set_anchor()
        self.sync()

    def sync(self, *, follow_playhead: bool = True) -> None:
        view = self.view
        view.refresh_view()
        if follow_playhead:
            view.select_flow(self.store.current_flow())
        self._update_header()
        self.show_detail(view.selected)

    def _set_anchor(self) -> None:
        event = self.store.current
        ts = event.ts if event is not None else self.timeline.start
        self._anchor = (self.replay_app.monotonic(), ts)

    def _tick(self) -> None:
        if not self.playing:
            return
        target = self.timeline.at_time(self._due())
        if target > self.store.position:
            self.move_to(target, anchor=False)
        if self.store.position >= len(self.timeline) - 1:
            self.pause()
        else:
            self._update_header()

    def pause(self) -> None:
        self.playing = False
        if self._timer is not None:
            self._timer.pause()
        self._update_header()

    def action_play(self) -> None:
        if self.playing:
            self.pause()
            return
        if self.store.position >= len(self.timeline) - 1:
            self.store.move_to(0)
        self.playing = True
        self._set_anchor()
        if self._timer is not None:
            self._timer.resume()
        self.sync()

    def _due(self) -> float:
        """The recorded time playing has reached (it runs on between events)."""
        started, ts = self._anchor
        return ts + (self.replay_app.monotonic() - started) * self.speed

    def action_speed(self, value: int = 0) -> None:
        due = self._due() if self.playing else None
        self.speed = value if value in SPEEDS else SPEEDS[(SPEEDS.index(self.speed) + 1) % 3]
        if due is not None:  # the new pace starts from where playing is, not the last event
            self._anchor = (self.replay_app.monotonic(), due)
        self._update_header()

    def play_at(self, speed: int) -> None:
        self.action_speed(speed)
        if not self.playing:
            self.action_play()

    def action_step(self, delta: int) -> None:
        self.move_to(self.store.position + delta)

    def action_edge(self, direction: int) -> None:
        self.move_to(len(self.timeline) - 1 if direction > 0 else 0)

    def action_jump(self, category: str, direction: int) -> None:
        found = self.timeline.next_mark(category, self.store.position, direction)
        if found is None:
            where = "after" if direction > 0 else "before"
            self.notify(f"No {category} event {where} this one.", markup=False)
            return
        self.move_to(found)

    # -- header and detail -----------------------------------------------------------------

    def _update_header(self) -> None:
        app, store, timeline = self.replay_app, self.store, self.timeline
        info = timeline.info
        first = Text(no_wrap=True, overflow="ellipsis")
        first.append(" SLUICE REPLAY ", Style(bold=True, reverse=True))
        first.append(" ")
        first.append(plain(app.source_name), DIM)
        first.append("  session ", DIM)
        first.append(plain(info.id), "bold")
        first.append("  subject ", DIM)
        first.append(plain(info.subject or "-"), Style(color="cyan"))
        first.append("  groups ", DIM)
        first.append(plain(", ".join(info.groups) or "-"))
        second = Text(no_wrap=True, overflow="ellipsis")
        if self.playing:
            second.append(f" ▶ PLAYING {self.speed}x ", Style(color="black", bgcolor="green"))
        else:
            second.append(f" ⏸ paused ({self.speed}x) ", Style(reverse=True))
        event = store.current
        second.append(f"  event {store.position + 1}/{len(timeline)}", "bold")
        if event is not None:
            second.append(f"  seq {event.seq}  ", DIM)
            second.append(app.precise_clock(event.ts))
            second.append(f"  +{event.ts - timeline.start:.3f}s", DIM)
            second.append(f" of {timeline.end - timeline.start:.3f}s  ", DIM)
            second.append(plain(event_summary(event.kind, event.data)), Style(color="yellow"))
        third = Text(no_wrap=True, overflow="ellipsis")
        third.append(" flows ", DIM)
        third.append(f"{store.visible_count}", "bold")
        third.append(f" of {len(timeline.by_flow)}", DIM)
        if store.matcher is not None:
            third.append("  (filtered)", DIM)
        if store.search_hits is not None:
            third.append(f"  search “{plain(self.search_text)}”: {len(store.search_hits)} flow(s)")
        third.append_text(tally_text(store.tally(), self.totals))
        lines = Text("\n").join([first, second, third])
        lines.no_wrap, lines.overflow = True, "ellipsis"  # three lines, whatever the width
        self.query_one(ReplayHeader).set_lines(lines)

    def show_detail(self, flow: Flow | None) -> None:
        pane = self.query_one(ReplayDetail)
        if flow is None:
            pane.show_replay(("none",), None)
            return
        if flow.request_id != self._detail_for:
            self._detail_for, self.mask_region = flow.request_id, 0
        current = self.store.current
        here = current is not None and current.request_id == flow.request_id
        key = (
            flow.n,
            flow.version,
            self.mask_region,
            self.store.untrusted(flow),
            current.pos if here and current else -1,
        )
        if pane.shows(key):
            return  # nothing changed: no reads, no redraw
        items = describe_replay(
            flow,
            self.store,
            self.recording,
            region=self.mask_region,
            clock=self.replay_app.detail_clock,
            precise=self.replay_app.precise_clock,
        )
        pane.show_replay(key, items)

    def on_flow_view_highlighted(self, message: FlowView.Highlighted) -> None:
        self.show_detail(message.flow)

    def action_region(self, delta: int) -> None:
        flow = self.view.selected
        spans = (flow.get("mask_spans") or []) if flow is not None else []
        if not spans:
            self.notify("The selected flow has no masked regions.", markup=False)
            return
        self.mask_region = (self.mask_region + delta) % len(spans)
        self.show_detail(flow)

    def set_integrity(self, integrity: Integrity | None) -> None:
        self.integrity = integrity
        self.store.untrusted_from = integrity.untrusted_from if integrity else None
        try:
            banner, view = self.query_one(IntegrityBanner), self.view
        except NoMatches:
            return  # not composed yet: on_mount shows self.integrity
        banner.show(integrity)
        view.invalidate()
        self.show_detail(view.selected)


def event_summary(kind: str, data: dict[str, Any]) -> str:
    """One line for the header: what this record says."""
    if kind == "request":
        line = f"request {data.get('method', '')} {data.get('target', '')} {data.get('url', '')}"
        if data.get("action") is not None:  # the request record carries its decision
            line += f" · {data['action']} ({data.get('rule') or 'default'})"
        return line
    if kind == "decision":
        return f"decision {data.get('action', '?')} ({data.get('rule') or 'default'})"
    if kind == "response":
        spans = data.get("mask_spans") or []
        return f"response {data.get('status', '?')}" + (f" · masked {len(spans)}" if spans else "")
    if kind == "approval.requested":
        return f"approval requested ({data.get('rule') or '?'})"
    if kind.startswith("approval."):
        return f"{kind} {data.get('state', '')} by {data.get('decided_by') or '-'}"
    if kind == "error":
        return f"error {data.get('status', '')} {data.get('error', '')}"
    if kind == "request.body":
        return "request body (streamed, recorded after it was sent)"
    return kind
