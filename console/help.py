"""The help screen: every key, gathered from the bindings themselves, and filter syntax."""

from __future__ import annotations

from collections.abc import Iterable

from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

FILTER_HELP = (
    "The filter bar speaks the policy's matcher language (proxy.matcher):\n"
    "  method:POST  target:repo  path:/api/**  status:>=400  status:4xx\n"
    "  decision:denied,held  rule:push-*  subject:agent-*  host:*.internal\n"
    "  !decision:allowed negates a term; a bare word matches paths containing it;\n"
    "  values separated by commas are alternatives; all terms must hold."
)


def key_table(sections: Iterable[tuple[str, list[Binding]]]) -> Table:
    table = Table(box=None, padding=(0, 2), show_header=False)
    table.add_column("key", style="bold cyan", no_wrap=True)
    table.add_column("what")
    table.add_column("id", style="dim")
    for title, bindings in sections:
        table.add_row(Text(title, style=Style(bold=True, underline=True)), Text(""), Text(""))
        for binding in bindings:
            table.add_row(
                Text(binding.key_display or binding.key),
                Text(binding.description or binding.action),
                Text(binding.id or ""),
            )
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close", id="help.close"),
        Binding("question_mark", "close", "Close", show=False, id="help.close_key"),
        Binding("q", "close", "Close", show=False, id="help.close_q"),
    ]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll {
        width: 90; max-width: 95%; height: 80%; border: thick $primary;
        background: $surface; padding: 0 1;
    }
    """

    def __init__(self, sections: list[tuple[str, list[Binding]]]) -> None:
        super().__init__()
        self.sections = sections

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(Text("Sluice console keys", style="bold"))
            yield Static(key_table(self.sections))
            yield Static(Text(FILTER_HELP))
            yield Static(Text("Ctrl+P opens the command palette with the same actions.", "dim"))

    def action_close(self) -> None:
        self.dismiss(None)
