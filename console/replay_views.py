"""Widgets of the replay view: the flow list, the sessions list, the header, the banner.

The flow list is the live ``FlowView`` (Line API) drawing a ``ReplayStore``, with two
additions per row: the count of masked regions whatever the decision, and an untrusted
mark on flows recorded at or after a seq where verification failed. The sessions list is
a Line API widget too, so a recording with thousands of sessions opens at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget

from console.flowview import FlowView
from console.model import Flow
from console.render import STYLES, fit, plain
from console.replay_model import CATEGORIES, Integrity, ReplayStore

UNTRUSTED = Style(color="white", bgcolor="red", bold=True)
DIM = Style(dim=True)
GOOD = Style(color="black", bgcolor="green", bold=True)
WARN = Style(color="black", bgcolor="yellow", bold=True)
BAD = Style(color="white", bgcolor="red", bold=True)
_NO_STYLE = Style()


class ReplayFlowView(FlowView):
    """The live flow list over a ``ReplayStore``; left/right step the playhead."""

    BINDINGS = [
        Binding("right", "screen.step(1)", "Step", key_display="→", id="replay.step_forward"),
        Binding("left", "screen.step(-1)", "Back", key_display="←", id="replay.step_back"),
    ]

    def __init__(self, store: ReplayStore, *, clock: Callable[[float], str], id: str) -> None:
        super().__init__(store, clock=clock, id=id)
        self.replay = store

    def select_flow(self, flow: Flow | None) -> None:
        """Put the cursor on ``flow`` (the playhead's flow) without posting a message."""
        self.follow = False
        if flow is None or not flow.shown:
            self.refresh()
            return
        self._select(self.store.index_of(flow), post=False)
        self._reveal()
        self.refresh()

    def invalidate(self) -> None:
        """Rows changed for a reason the cache keys do not see (integrity arrived)."""
        self._cache.clear()
        self.refresh()

    def _draw(self, flow: Flow, base: Style, width: int) -> Strip:
        from console.render import row_cells

        cells = row_cells(flow, self.clock)
        label, kind = cells["decision"]
        masked = flow.get("masked") or 0
        if masked and "masked" not in label:
            label = f"{label} · masked {masked}"
        if self.replay.untrusted(flow):
            label, kind = f"⚠ UNTRUSTED {label}", "untrusted"
        cells["decision"] = (label, kind)
        segments: list[Segment] = []
        space = Segment(" ", base)
        for index, column in enumerate(self._columns):
            if index:
                segments.append(space)
            value, style = cells[column.name]
            extra = UNTRUSTED if style == "untrusted" else STYLES.get(style, _NO_STYLE)
            segments.append(Segment(fit(plain(value), column.width, column.align), base + extra))
        return Strip(segments).adjust_cell_length(width, base)


# -- sessions ------------------------------------------------------------------------------

SESSION_COLUMNS = (
    ("SESSION", 30, "left"),
    ("SUBJECT", 16, "left"),
    ("START", 19, "left"),
    ("DURATION", 8, "right"),
    ("REQS", 6, "right"),
    ("DENIED", 6, "right"),
    ("HELD", 5, "right"),
    ("MASKED", 6, "right"),
    ("ERRORS", 6, "right"),
    ("INTEGRITY", 14, "left"),
)
_STATE_STYLE = {
    "verified": Style(color="green", bold=True),
    "repaired tail": Style(color="green"),
    "unsigned": Style(color="yellow", bold=True),
    "torn tail": Style(color="yellow", bold=True),
    "tampered": Style(color="red", bold=True, reverse=True),
}


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class SessionList(ScrollView, can_focus=True):
    """Recorded sessions, one per row; Enter opens the highlighted one."""

    BINDINGS = [
        Binding("up", "move(-1)", "Up", show=False, id="sessions.up"),
        Binding("down", "move(1)", "Down", show=False, id="sessions.down"),
        Binding("pageup", "move(-20)", "Page up", show=False, id="sessions.page_up"),
        Binding("pagedown", "move(20)", "Page down", show=False, id="sessions.page_down"),
        Binding("home", "move(-1000000000)", "First", show=False, id="sessions.first"),
        Binding("end", "move(1000000000)", "Last", show=False, id="sessions.last"),
        Binding("enter", "open", "Open session", id="sessions.open"),
    ]
    DEFAULT_CSS = """
    SessionList { background: $surface; overflow-x: hidden; overflow-y: scroll; height: 1fr; }
    """

    class Chosen(Message):
        def __init__(self, session: Any) -> None:
            super().__init__()
            self.session = session

    def __init__(self, sessions: Sequence[Any], clock: Callable[[float], str], id: str) -> None:
        super().__init__(id=id)
        self.sessions = list(sessions)
        self.clock = clock
        self.cursor = len(self.sessions) - 1  # the newest session first under the cursor
        self.states: dict[str, str] = {}

    def on_mount(self) -> None:
        self.virtual_size = Size(self.size.width, len(self.sessions) + 1)
        self.call_after_refresh(self._reveal)

    def on_resize(self, _event: events.Resize) -> None:
        self.virtual_size = Size(self.size.width, len(self.sessions) + 1)

    def set_states(self, states: dict[str, str]) -> None:
        self.states = states
        self.refresh()

    def _reveal(self) -> None:
        rows = max(1, self.scrollable_content_region.height - 1)
        top = round(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False)
        elif self.cursor >= top + rows:
            self.scroll_to(y=self.cursor - rows + 1, animate=False)

    def action_move(self, delta: int) -> None:
        if self.sessions:
            self.cursor = max(0, min(len(self.sessions) - 1, self.cursor + delta))
            self._reveal()
            self.refresh()

    def action_open(self) -> None:
        if 0 <= self.cursor < len(self.sessions):
            self.post_message(self.Chosen(self.sessions[self.cursor]))

    def on_click(self, event: events.Click) -> None:
        row = round(self.scroll_y) + event.y - 1
        if event.y >= 1 and 0 <= row < len(self.sessions):
            self.cursor = row
            self.refresh()
            if event.chain >= 2:
                self.action_open()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.rich_style
        if y == 0:
            text = Text(" ".join(fit(t, w, a) for t, w, a in SESSION_COLUMNS))
            return Strip(text.render(self.app.console)).adjust_cell_length(
                width, base + Style(bold=True, dim=True)
            )
        row = round(self.scroll_y) + y - 1
        if row >= len(self.sessions):
            return Strip.blank(width, base)
        s = self.sessions[row]
        style = base + Style(reverse=True) if row == self.cursor else base
        state = self.states.get(s.id, "checking…")
        start = self.clock(s.start) if s.start else "?"
        values = (
            s.id,
            s.subject or "-",
            start,
            duration_text(s.duration),
            str(s.requests),
            str(s.denied),
            str(s.held),
            str(s.masked),
            str(s.errors),
            state,
        )
        segments: list[Segment] = []
        for n, ((_, w, align), value) in enumerate(zip(SESSION_COLUMNS, values, strict=True)):
            if n:
                segments.append(Segment(" ", style))
            extra = _STATE_STYLE.get(value, _NO_STYLE) if n == len(values) - 1 else _NO_STYLE
            segments.append(Segment(fit(plain(value), w, align), style + extra))
        return Strip(segments).adjust_cell_length(width, style)


def session_clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


# -- header and banner ---------------------------------------------------------------------


class ReplayHeader(Widget):
    """Which recording and session, where the playhead is, what has happened so far."""

    DEFAULT_CSS = """
    ReplayHeader { height: 3; background: $panel; text-wrap: nowrap; text-overflow: ellipsis; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.lines: Text = Text()

    def set_lines(self, text: Text) -> None:
        self.lines = text
        self.refresh()

    def render(self) -> Text:
        return self.lines


def tally_text(tally: dict[str, int], totals: dict[str, int]) -> Text:
    text = Text()
    for name in CATEGORIES:
        text.append(f"  {name} ", DIM)
        style = STYLES.get(name, _NO_STYLE) if tally[name] else _NO_STYLE
        text.append(f"{tally[name]}/{totals[name]}", style)
    return text


def banner_text(integrity: Integrity | None) -> tuple[Text, str]:
    """The integrity banner's text and its CSS class."""
    if integrity is None or integrity.state == "checking":
        return Text(" … checking the recording's integrity (hash chain and signatures)"), "-dim"
    state = integrity.state
    keys = ", ".join(k[:16] for k in integrity.key_ids) or "no key"
    if state == "verified":
        return Text(f" ✔ VERIFIED and signed: hash chain intact, key {keys}"), "-good"
    if state == "repaired tail":
        return (
            Text(f" ✔ VERIFIED and signed (key {keys}); the recorder once cut a torn tail"),
            "-good",
        )
    if state == "unsigned":
        start = integrity.unsigned_from
        where = f" from seq {start}" if start is not None else ""
        return (
            Text(
                f" ? UNSIGNED{where}: the chain is intact but no checkpoint seals it, so it "
                "is not provably original (a crash, or a file still being written)"
            ),
            "-warn",
        )
    if state == "torn tail":
        return (
            Text(
                f" ✖ TORN TAIL at seq {integrity.first_bad_seq}: a partial last record "
                "(a crash mid-write); flows from there are marked untrusted"
            ),
            "-warn",
        )
    if state == "tampered":
        return (
            Text(
                f" ✖ TAMPERED at seq {integrity.first_bad_seq}: {plain(integrity.reason)}; "
                "flows from that seq on are marked untrusted"
            ),
            "-bad",
        )
    return Text(f" ✖ integrity unknown: {plain(integrity.reason or state)}"), "-bad"


class IntegrityBanner(Widget):
    DEFAULT_CSS = """
    IntegrityBanner { height: 1; text-style: bold; text-wrap: nowrap; text-overflow: ellipsis; }
    IntegrityBanner.-dim { background: $panel; color: $text-muted; }
    IntegrityBanner.-good { background: $success 60%; color: $text; }
    IntegrityBanner.-warn { background: $warning; color: black; }
    IntegrityBanner.-bad { background: $error; color: white; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.text, self.kind = banner_text(None)

    def on_mount(self) -> None:
        self.add_class(self.kind)

    def show(self, integrity: Integrity | None) -> None:
        self.remove_class(self.kind)
        self.text, self.kind = banner_text(integrity)
        self.add_class(self.kind)
        self.refresh()

    def render(self) -> Text:
        return self.text
