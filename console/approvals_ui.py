"""The approval prompt and the pending-queue panel.

The prompt is built so nobody approves by accident: Deny has the focus, every key and
click is ignored for the first half second (the app drops them before any binding sees
them), and "always" shows the exact rule it will write before anyone presses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Static

from console.render import highlight_body, plain

GUARD_SECONDS = 0.5
DIM = Style(dim=True)
LABEL = Style(bold=True, color="bright_blue")


@dataclass(frozen=True)
class Verdict:
    """What the approver chose; the app POSTs it."""

    approval_id: str
    decision: str  # "approve" | "deny"
    scope: str  # "once" | "session" | "always"
    reason: str = ""


def always_rule_text(summary: dict[str, Any]) -> Text:
    """The rule scope "always" writes: this method, target and exact path (and query)."""
    text = Text()
    text.append("always writes: ", DIM)
    text.append("allow ", "bold green")
    text.append(plain(summary.get("method", "")), "bold")
    text.append(" target=", DIM)
    text.append(plain(summary.get("target", "")))
    if summary.get("port") is not None:  # forward requests are bound to their destination
        text.append(" host=", DIM)
        text.append(plain(summary.get("host", "")))
        text.append(" port=", DIM)
        text.append(plain(str(summary.get("port"))))
        if summary.get("method") == "CONNECT":
            return text
    text.append(" path=", DIM)
    text.append(plain(summary.get("path", "")))
    query = summary.get("query") or ""
    text.append(" query=", DIM)
    text.append(plain(query) if query else "(none)")
    return text


def destination(summary: dict[str, Any]) -> str:
    """``host:port`` before the path of a forward request ("" for target requests)."""
    port = summary.get("port")
    if port is None or summary.get("method") == "CONNECT":
        return ""
    host = str(summary.get("host") or "")
    return f"{f'[{host}]' if ':' in host else host}:{port}"


def _field(label: str, value: object, style: Style | str = "") -> Text:
    text = Text()
    text.append(f"{label:<9}", LABEL)
    text.append(plain(value), style)
    return text


class ApprovalPrompt(ModalScreen[Verdict | None]):
    """One held request; dismissed with a Verdict, or None (later / decided elsewhere)."""

    BINDINGS = [
        Binding("a", "decide('approve', 'once')", "Approve once", id="prompt.approve_once"),
        Binding("s", "decide('approve', 'session')", "Approve session", id="prompt.session"),
        Binding("A", "decide('approve', 'always')", "Approve always", id="prompt.always"),
        Binding("d", "decide('deny', 'once')", "Deny", id="prompt.deny"),
        Binding("r", "reason", "Type reason", id="prompt.reason"),
        Binding("escape", "later", "Later", id="prompt.later"),
    ]
    DEFAULT_CSS = """
    ApprovalPrompt { align: center middle; }
    ApprovalPrompt > #prompt-box {
        width: 100; max-width: 95%; height: auto; max-height: 90%;
        border: thick $warning; background: $surface; padding: 0 1;
    }
    ApprovalPrompt #prompt-title { text-style: bold; color: $warning; }
    ApprovalPrompt #prompt-preview { height: auto; max-height: 12; border: round $panel; }
    ApprovalPrompt #prompt-buttons { height: 3; }
    ApprovalPrompt #prompt-buttons Button { margin: 0 1 0 0; min-width: 12; }
    ApprovalPrompt #prompt-status { color: $error; }
    """

    def __init__(
        self,
        summary: dict[str, Any],
        *,
        clock: Callable[[float], str] | None = None,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.summary = summary
        self.approval_id = str(summary.get("id", ""))
        self._now = now
        self._monotonic = monotonic
        self.opened_at = monotonic()
        self.busy = False

    @property
    def guarded(self) -> bool:
        """True during the first half second: input is ignored then."""
        return self._monotonic() - self.opened_at < GUARD_SECONDS

    def compose(self) -> ComposeResult:
        s = self.summary
        target = destination(s) + f"{s.get('path', '')}"
        target += f"?{s.get('query')}" if s.get("query") else ""
        with Vertical(id="prompt-box"):
            yield Static(self._title(), id="prompt-title")
            request = _field("request", s.get("method", ""), "bold")
            request.append(" ")
            request.append(plain(s.get("target", "")), "blue")
            request.append(" ")
            request.append(plain(target))
            yield Static(request)
            who = _field("subject", s.get("subject", "-"), "cyan")
            who.append("  session ", DIM)
            who.append(plain(s.get("session", "-")))
            yield Static(who)
            rule = _field("rule", s.get("rule") or "-", "magenta")
            rule.append("  ")
            rule.append(plain(s.get("reason") or ""), "italic")
            yield Static(rule)
            yield Static(_field("id", s.get("id", ""), DIM))
            with VerticalScroll(id="prompt-preview"):
                preview = s.get("preview") or ""
                yield Static(
                    highlight_body(str(preview)) if preview else Text("(empty body)", style=DIM)
                )
            yield Static(always_rule_text(s), id="prompt-always")
            yield Input(
                placeholder="reason (optional): r to type, enter denies with it",
                id="prompt-reason",
                max_length=2000,
            )
            with Horizontal(id="prompt-buttons"):
                yield Button("Deny (d)", variant="error", id="deny")
                yield Button("Approve once (a)", variant="success", id="approve-once")
                yield Button("Session (s)", id="approve-session")
                yield Button("Always (A)", id="approve-always")
            yield Static("", id="prompt-status")

    def _title(self) -> Text:
        deadline = self.summary.get("deadline")
        left = max(0, int(float(deadline) - self._now())) if deadline else None
        text = Text("Approval needed", style="bold")
        if left is not None:
            text.append(f"  {left}s left" if left else "  deadline passed", "bold yellow")
        return text

    def on_mount(self) -> None:
        self.query_one("#deny", Button).focus()
        self.set_interval(1.0, self._tick)

    def _tick(self) -> None:
        self.query_one("#prompt-title", Static).update(self._title())

    # -- actions --------------------------------------------------------------------------

    def action_decide(self, decision: str, scope: str) -> None:
        if self.guarded or self.busy:
            return
        reason = self.query_one("#prompt-reason", Input).value.strip()
        self.busy = True
        self.dismiss(Verdict(self.approval_id, decision, scope, reason))

    def action_reason(self) -> None:
        if not self.guarded:
            self.query_one("#prompt-reason", Input).focus()

    def action_later(self) -> None:
        if not self.guarded:
            self.dismiss(None)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        choices = {
            "deny": ("deny", "once"),
            "approve-once": ("approve", "once"),
            "approve-session": ("approve", "session"),
            "approve-always": ("approve", "always"),
        }
        if event.button.id in choices:
            self.action_decide(*choices[event.button.id])

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_decide("deny", "once")

    def closed_elsewhere(self, summary: dict[str, Any]) -> None:
        """Another console (or the deadline) closed it: leave without deciding."""
        if not self.busy:
            self.busy = True
            self.dismiss(None)


def approval_line(summary: dict[str, Any], now: float) -> Text:
    deadline = summary.get("deadline")
    left = max(0, int(float(deadline) - now)) if deadline else None
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append("● ", "bold yellow")
    text.append(plain(summary.get("method", "")), "bold")
    text.append(" ")
    text.append(plain(summary.get("target", "")), "blue")
    text.append(" ")
    text.append(plain(destination(summary) + str(summary.get("path", ""))))
    text.append("  ")
    text.append(plain(summary.get("subject", "")), "cyan")
    text.append("  ")
    text.append(plain(summary.get("rule") or "-"), "magenta")
    if left is not None:
        text.append(f"  {left}s", "yellow")
    return text


class ApprovalPanel(Widget):
    """The pending queue, oldest first; hidden while nothing waits."""

    DEFAULT_CSS = """
    ApprovalPanel { height: auto; max-height: 8; border-top: heavy $warning; display: none; }
    ApprovalPanel.-pending { display: block; }
    """

    def __init__(self, *, now: Callable[[], float] = time.time, id: str | None = None) -> None:
        super().__init__(id=id)
        self._now = now
        self.pending: list[dict[str, Any]] = []

    def show(self, pending: list[dict[str, Any]]) -> None:
        self.pending = pending
        self.set_class(bool(pending), "-pending")
        self.refresh(layout=True)

    def render(self) -> Text:
        title = Text(f"Pending approvals: {len(self.pending)}", style="bold yellow")
        title.append("   p to review the oldest", DIM)
        now = self._now()
        lines = [title] + [approval_line(item, now) for item in self.pending[:6]]
        if len(self.pending) > 6:
            lines.append(Text(f"… and {len(self.pending) - 6} more", style=DIM))
        return Text("\n").join(lines)
