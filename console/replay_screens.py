"""Screens around the replay: the sessions browser, a one-line prompt, what-if results.

Every string from the recording or a config error is placed in ``Text`` (never parsed as
markup). The what-if table lists changed decisions first; Enter jumps the playhead to
that request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Input, Static

from console.render import plain
from console.replay_views import IntegrityBanner, SessionList
from console.replay_whatif import WhatIf

DIM = Style(dim=True)
CHANGED = Style(color="black", bgcolor="yellow", bold=True)
_ACTION_STYLE = {
    "allow": Style(color="green"),
    "deny": Style(color="red", bold=True),
    "hold": Style(color="yellow", bold=True),
    "?": Style(dim=True),
}


class SessionsScreen(Screen[None]):
    """Pick a session: subject, start, duration, counts and the integrity of its files."""

    BINDINGS = [
        Binding("v", "app.integrity", "Integrity", id="sessions.integrity"),
        Binding("question_mark", "app.help", "Help", key_display="?", id="sessions.help"),
        Binding("q", "app.quit", "Quit", id="sessions.quit"),
    ]
    AUTO_FOCUS = "SessionList"
    CSS = "SessionsScreen #sessions-title { height: 2; background: $panel; }"

    def __init__(self, title: Text, sessions: Sequence[Any], clock: Callable[[float], str]):
        super().__init__(id="sessions-screen")
        self.title_text = title
        self.sessions = sessions
        self.clock = clock

    def compose(self) -> ComposeResult:
        yield Static(self.title_text, id="sessions-title")
        yield IntegrityBanner(id="sessions-banner")
        yield SessionList(self.sessions, self.clock, id="sessions")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(SessionList).focus()
        apply = getattr(self.app, "apply_integrity", None)
        if apply is not None:  # verify may have finished before this screen existed
            apply(self)


class PromptScreen(ModalScreen[str | None]):
    """One line of input; ``check`` returns an error to show (the prompt stays open)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt.cancel")]
    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen > Vertical {
        width: 100; max-width: 95%; height: auto; border: thick $primary;
        background: $surface; padding: 0 1;
    }
    PromptScreen #prompt-error { color: $error; height: auto; }
    """

    def __init__(
        self,
        title: str,
        hint: str,
        value: str = "",
        check: Callable[[str], str | None] | None = None,
        *,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.title_text, self.hint, self.value, self.check = title, hint, value, check

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(Text(self.title_text, style="bold"))
            yield Static(Text(self.hint, style=DIM))
            yield Input(value=self.value, id="prompt-input")
            yield Static("", id="prompt-error")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        error = self.check(event.value) if self.check is not None else None
        if error:
            self.query_one("#prompt-error", Static).update(Text(plain(error, newlines=True)))
            return
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


def whatif_summary(source: str, rows: Sequence[WhatIf]) -> Text:
    changed = sum(1 for row in rows if row.changed)
    rules = sum(1 for row in rows if row.rule_changed)
    text = Text()
    text.append("What-if ", Style(bold=True))
    text.append(plain(source))
    text.append(f"\n{len(rows)} recorded requests: ", DIM)
    text.append(f"{changed} decision(s) would change", CHANGED if changed else Style(bold=True))
    text.append(f", {rules} more by another rule", DIM)
    text.append("  (Enter: go to the request, Esc: close)", DIM)
    return text


class WhatIfScreen(ModalScreen[int | None]):
    """The decision another config would make for each recorded request."""

    BINDINGS = [Binding("escape,q", "close", "Close", id="whatif.close")]
    DEFAULT_CSS = """
    WhatIfScreen { align: center middle; }
    WhatIfScreen > Vertical {
        width: 98%; height: 90%; border: thick $primary; background: $surface;
    }
    WhatIfScreen #whatif-title { height: 2; padding: 0 1; }
    WhatIfScreen DataTable { height: 1fr; }
    """

    def __init__(self, source: str, rows: Sequence[WhatIf]) -> None:
        super().__init__(id="whatif")
        self.source = source
        self.rows = list(rows)

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(whatif_summary(self.source, self.rows), id="whatif-title")
            yield DataTable(cursor_type="row", zebra_stripes=True, id="whatif-table")
            yield Footer()

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for title in ("", "SEQ", "METHOD", "TARGET", "PATH", "RECORDED", "WHAT-IF", "WHY"):
            table.add_column(title)
        for n, row in enumerate(self.rows):
            mark = (
                Text(" CHANGED ", CHANGED)
                if row.changed
                else Text("rule", Style(color="yellow"))
                if row.rule_changed
                else Text("same", DIM)
            )
            table.add_row(
                mark,
                Text(str(row.seq), DIM),
                Text(plain(row.method), "bold"),
                Text(plain(row.target), Style(color="blue")),
                Text(plain(row.path)),
                _verdict(row.shown_recorded, row.recorded_rule),
                _verdict(row.shown_would, row.would_rule),
                Text(plain(row.reason + (f" ({row.note})" if row.note else ""))),
                key=str(n),
            )
        table.focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.dismiss(self.rows[int(str(event.row_key.value))].pos)

    def action_close(self) -> None:
        self.dismiss(None)


def _verdict(action: str, rule: str | None) -> Text:
    text = Text(action, _ACTION_STYLE.get(action, Style()))
    text.append(f" {plain(rule) if rule else '(default)'}", DIM)
    return text
