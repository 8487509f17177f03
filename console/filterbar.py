"""The filter bar: typed text compiled by ``proxy.filter_language.parse_filter``, the same language
as policy rules, with errors marked inline at their position."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Input, Static

from console.render import plain
from proxy.filter_language import parse_filter
from proxy.matcher import Matcher, MatcherError

FILTER_DEBOUNCE = 0.15
PLACEHOLDER = "filter: method:POST path:/api/** status:>=400 !decision:allowed  (/)"


def filter_error_text(text: str, error: MatcherError) -> Text:
    """The filter text with the offending term marked, and the message under it."""
    position = error.position if error.position is not None else 0
    shown = Text(" ")
    shown.append(plain(text[:position]))
    shown.append(plain(text[position:]) or " ", Style(color="white", bgcolor="red", bold=True))
    caret = Text(" " + " " * len(plain(text[:position])) + "^ ", style="bold red")
    caret.append(plain(str(error)), Style(color="red"))
    return Text("\n").join([shown, caret])


class FilterBar(Vertical):
    """Posts ``Applied`` with a compiled matcher (None: show all) when the text is valid;
    an invalid text leaves the last good filter in force."""

    DEFAULT_CSS = """
    FilterBar { height: auto; }
    FilterBar #filter { height: 3; border: tall $panel; }
    FilterBar #filter.-invalid { border: tall $error; }
    FilterBar #filter-error { height: 2; display: none; }
    FilterBar #filter-error.-shown { display: block; }
    """

    class Applied(Message):
        def __init__(self, matcher: Matcher | None, submitted: bool) -> None:
            super().__init__()
            self.matcher = matcher
            self.submitted = submitted

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Input(placeholder=PLACEHOLDER, id="filter")
        yield Static("", id="filter-error")

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        if self._timer is not None:
            self._timer.stop()
        value = event.value
        self._timer = self.set_timer(FILTER_DEBOUNCE, lambda: self.apply(value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self._timer is not None:
            self._timer.stop()
        self.apply(event.value, submitted=True)

    def compile(self, text: str) -> tuple[bool, Matcher | None]:
        """Parse ``text``; show or clear the inline error. (ok, matcher)"""
        error_box = self.query_one("#filter-error", Static)
        box = self.query_one("#filter", Input)
        try:
            matcher = parse_filter(text) if text.strip() else None
        except MatcherError as exc:
            error_box.update(filter_error_text(text, exc))
            error_box.add_class("-shown")
            box.add_class("-invalid")
            return False, None
        error_box.remove_class("-shown")
        box.remove_class("-invalid")
        return True, matcher

    def apply(self, text: str, *, submitted: bool = False) -> bool:
        ok, matcher = self.compile(text)
        if ok:
            self.post_message(self.Applied(matcher, submitted))
        return ok
