"""The flow list: a Line API widget that draws only the rows on screen.

``DataTable`` costs ~130 ms per added row at 50k rows and ``ListView`` is worse; this
widget reads rows straight from ``FlowStore`` in ``render_line`` and caches the strips it
drew, so a frame costs the same at 100 rows or 100,000. It never receives one message per
event: the app applies a batch to the store, then calls ``refresh_view()`` once.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from console.model import Flow, FlowStore
from console.render import STYLES, Column, fit, header_text, layout, local_clock, plain, row_cells

_NO_STYLE = Style()


class FlowView(ScrollView, can_focus=True):
    """Rows of flows, newest at the bottom; line 0 is a fixed column header."""

    BINDINGS = [
        Binding("up", "cursor(-1)", "Up", show=False, id="flows.up"),
        Binding("down", "cursor(1)", "Down", show=False, id="flows.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="flows.page_up"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="flows.page_down"),
        Binding("home", "first", "First", show=False, id="flows.first"),
        Binding("end", "follow", "Follow", id="flows.follow"),
    ]
    COMPONENT_CLASSES = {"flowview--cursor", "flowview--header"}
    DEFAULT_CSS = """
    FlowView { background: $surface; overflow-x: hidden; overflow-y: scroll; }
    FlowView > .flowview--cursor { background: $accent 40%; text-style: bold; }
    FlowView:focus > .flowview--cursor { background: $accent 70%; }
    FlowView > .flowview--header { background: $panel; text-style: bold; }
    """

    follow: reactive[bool] = reactive(True)

    class Highlighted(Message):
        """The user moved the selection to another flow."""

        def __init__(self, flow: Flow | None) -> None:
            super().__init__()
            self.flow = flow

    def __init__(
        self,
        store: FlowStore,
        *,
        clock: Callable[[float], str] = local_clock,
        id: str | None = None,
    ) -> None:
        super().__init__(id=id)
        self.store = store
        self.clock = clock
        self.cursor = -1
        self.selected: Flow | None = None
        self._top: Flow | None = None
        self._cache: LRUCache[tuple[int, int, int, bool], Strip] = LRUCache(1024)
        self._columns: list[Column] = layout(80)
        self._width = -1
        self._scrolling = False
        self._base = Style()
        self._cursor_style = Style()
        self._width_now = 80
        #: Called with each flow whose row was drawn (benchmarks measure latency with it).
        self.on_row_drawn: Callable[[Flow], None] | None = None

    # -- data -> view -----------------------------------------------------------------

    @property
    def page_rows(self) -> int:
        return max(1, self.scrollable_content_region.height - 1)

    def refresh_view(self) -> None:
        """After a batch: resize the scroll range, keep the selection and the view steady."""
        count = self.store.visible_count
        self.virtual_size = Size(self.scrollable_content_region.width, count + 1)
        if self.follow:
            self._select(count - 1, post=False)
            self._jump_to(max(0, count + 1 - self.scrollable_content_region.height))
        else:
            if self.selected is not None:
                self.cursor = self.store.index_of(self.selected) if count else -1
                if count and self.store.visible(self.cursor) is not self.selected:
                    self.selected = self.store.visible(self.cursor)
            if self._top is not None and count:
                self._jump_to(self.store.index_of(self._top))
        self.refresh()

    def _jump_to(self, y: int) -> None:
        if y != round(self.scroll_y):
            self._scrolling = True
            try:
                self.scroll_to(y=y, animate=False, immediate=True)
            finally:
                self._scrolling = False

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if not self._scrolling and new_value < old_value:
            self.follow = False  # the user scrolled up: stop chasing the newest row

    def _on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        self.follow = False
        super()._on_mouse_scroll_up(event)

    def on_resize(self, _event: events.Resize) -> None:
        self._cache.clear()
        self.refresh_view()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._cache.clear()

    # -- selection ----------------------------------------------------------------------

    def _select(self, index: int, *, post: bool = True) -> None:
        count = self.store.visible_count
        index = max(0, min(index, count - 1)) if count else -1
        flow = self.store.visible(index) if index >= 0 else None
        changed = flow is not self.selected
        self.cursor, self.selected = index, flow
        if changed and post:
            self.post_message(self.Highlighted(flow))

    def _reveal(self) -> None:
        top = round(self.scroll_y)
        if self.cursor < top:
            self._jump_to(self.cursor)
        elif self.cursor >= top + self.page_rows:
            self._jump_to(self.cursor - self.page_rows + 1)

    def move(self, delta: int) -> None:
        self.follow = False
        self._select(self.cursor + delta)
        self._reveal()
        if self.cursor >= self.store.visible_count - 1 and delta > 0:
            self.follow = True
        self.refresh()

    def action_cursor(self, delta: int) -> None:
        self.move(delta)

    def action_page(self, direction: int) -> None:
        self.move(direction * self.page_rows)

    def action_first(self) -> None:
        self.move(-self.cursor)

    def action_follow(self) -> None:
        self.follow = True
        self.refresh_view()
        self.post_message(self.Highlighted(self.selected))

    def watch_follow(self, value: bool) -> None:
        self.set_class(value, "-following")

    def on_click(self, event: events.Click) -> None:
        if event.y >= 1:
            self.follow = False
            self._select(round(self.scroll_y) + event.y - 1)
            self.refresh()

    # -- drawing ------------------------------------------------------------------------

    def render_lines(self, crop: Region) -> list[Strip]:
        """Styles are looked up once per frame, not once per row."""
        self._base = self.rich_style
        self._cursor_style = self.get_component_rich_style("flowview--cursor")
        self._width_now = self.scrollable_content_region.width
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self._width_now
        if width != self._width:
            self._width = width
            self._columns = layout(width)
            self._cache.clear()
        base = self._base
        if y == 0:
            header = self.get_component_rich_style("flowview--header")
            text = header_text(self._columns)
            return Strip(text.render(self.app.console), text.cell_len).adjust_cell_length(
                width, base + header
            )
        row = round(self.scroll_y) + y - 1
        if y == 1:
            self._top = self.store.visible(row) if row < self.store.visible_count else None
        if row >= self.store.visible_count:
            return Strip.blank(width, base)
        flow = self.store.visible(row)
        selected = flow is self.selected
        key = (flow.n, flow.version, width, selected)
        strip = self._cache.get(key)
        if strip is None:
            strip = self._draw(flow, base + self._cursor_style if selected else base, width)
            self._cache[key] = strip
            if self.on_row_drawn is not None:
                self.on_row_drawn(flow)
        return strip

    def _draw(self, flow: Flow, base: Style, width: int) -> Strip:
        cells = row_cells(flow, self.clock)
        segments: list[Segment] = []
        space = Segment(" ", base)
        for index, column in enumerate(self._columns):
            if index:
                segments.append(space)
            value, style = cells[column.name]
            segments.append(
                Segment(
                    fit(plain(value), column.width, column.align),
                    base + STYLES.get(style, _NO_STYLE),
                )
            )
        return Strip(segments).adjust_cell_length(width, base)
