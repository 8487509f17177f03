"""The status header and the connection banner.

The header answers "can I trust what I see?": which proxy, whether identity is off, the
last config reload's result (with the error when a reload was rejected), and the counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from console.client import ConnChange, ConnState
from console.render import plain

DIM = Style(dim=True)
GOOD = Style(color="green", bold=True)
BAD = Style(color="white", bgcolor="red", bold=True)
WARN = Style(color="black", bgcolor="yellow", bold=True)


@dataclass
class Status:
    """Everything the header shows; the app fills it in, the header only draws it."""

    url: str = ""
    conn: ConnChange = field(default_factory=lambda: ConnChange(ConnState.CONNECTING))
    health: dict[str, Any] = field(default_factory=dict)
    reload_error: str | None = None
    reload_note: str | None = None
    flows: int = 0
    shown: int = 0
    seen: int = 0
    denied: int = 0
    pending: int = 0
    filtering: bool = False


def _uptime(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def header_lines(status: Status) -> Text:
    health = status.health
    first = Text(no_wrap=True, overflow="ellipsis")
    first.append(" SLUICE ", Style(bold=True, reverse=True))
    first.append(" ")
    state = status.conn.state
    if state is ConnState.CONNECTED:
        first.append("● connected", GOOD)
    elif state is ConnState.CONNECTING:
        first.append("○ connecting", DIM)
    else:
        first.append("✖ disconnected", Style(color="red", bold=True))
    first.append("  ")
    first.append(plain(status.url), DIM)
    if health:
        first.append(f"  v{plain(health.get('version', '?'))}", DIM)
        first.append(f"  up {_uptime(health.get('uptime_s'))}", DIM)
        identity = str(health.get("identity", "?"))
        first.append("  identity ", DIM)
        if identity == "none":
            first.append(" NONE: agents are not identified ", WARN)
        else:
            first.append(plain(identity), "bold")
        recorder = health.get("recorder")
        if recorder is not None:
            first.append("  recorder ", DIM)
            value = recorder.get("state", recorder) if isinstance(recorder, dict) else recorder
            first.append(plain(value), "bold")
        principal = health.get("principal")
        if principal:
            first.append("  as ", DIM)
            first.append(plain(principal))
    second = Text(no_wrap=True, overflow="ellipsis")
    second.append(" flows ", DIM)
    second.append(f"{status.flows:,}", "bold")
    if status.shown != status.flows:
        second.append(f" ({status.shown:,} match the filter)", DIM)
    if status.filtering:
        second.append(" filtering…", "italic")
    second.append("  denied ", DIM)
    second.append(f"{status.denied:,}", "bold red" if status.denied else "bold")
    second.append("  pending approvals ", DIM)
    second.append(f"{status.pending}", WARN if status.pending else Style(bold=True))
    if health:
        second.append("  in flight ", DIM)
        second.append(str(health.get("in_flight", "?")))
    second.append("  config ", DIM)
    error = status.reload_error or (health.get("config") or {}).get("last_error")
    if error:
        second.append(" RELOAD REJECTED ", BAD)
        second.append(" ")
        second.append(plain(error).replace("\n", " ⏎ "), Style(color="red"))
    elif status.reload_note:
        second.append(plain(status.reload_note), GOOD)
    else:
        reloads = (health.get("config") or {}).get("reloads", 0)
        second.append(f"ok, {reloads} reload(s)" if health else "?", DIM)
    return Text("\n").join([first, second])


class StatusHeader(Widget):
    DEFAULT_CSS = "StatusHeader { height: 2; background: $panel; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.status = Status()

    def render(self) -> Text:
        return header_lines(self.status)


class Banner(Widget):
    """Shown while the connection to the proxy is lost: what is on screen may be stale."""

    DEFAULT_CSS = """
    Banner { height: 1; background: $error; color: $text; text-style: bold; display: none; }
    Banner.-lost { display: block; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.text = Text()

    def show(self, change: ConnChange) -> None:
        lost = change.state in (ConnState.LOST, ConnState.RECONNECTING)
        self.set_class(lost, "-lost")
        if lost:
            text = Text(" Connection to the proxy lost: ")
            text.append(plain(change.reason or "unknown reason"))
            text.append(
                f"  (reconnecting, attempt {change.attempt}; the view may be stale)"
                if change.state is ConnState.RECONNECTING
                else "  (will retry; the view may be stale)"
            )
            self.text = text
        self.refresh()

    @property
    def lost(self) -> bool:
        return self.has_class("-lost")

    def render(self) -> Text:
        return self.text
