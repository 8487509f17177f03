"""The replay screen's tools: filter, content search, seek, what-if and HAR export.

A mixin of ``ReplayScreen`` (kept apart to keep each file short). Slow work runs in
threads with their own ``Recording`` (the reader is not thread-safe) and reports back
with ``call_from_thread``; every message built from recorded text is shown without markup.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual import work
from textual.widgets import Input

from console.filterbar import FilterBar
from console.replay_detail import ReplayDetail
from console.replay_find import parse_seek, search_flows
from console.replay_screens import PromptScreen, WhatIfScreen
from proxy.recording import Recording

if TYPE_CHECKING:
    from console.replay_app import ReplayApp
    from console.replay_model import ReplayStore, Timeline
    from console.replay_views import ReplayFlowView


class ReplayTools:
    """Filter, search, seek, what-if and export for ``ReplayScreen``."""

    if TYPE_CHECKING:
        store: ReplayStore
        timeline: Timeline
        search_text: str

        @property
        def replay_app(self) -> ReplayApp: ...
        @property
        def view(self) -> ReplayFlowView: ...
        @property
        def app(self) -> Any: ...
        def query_one(self, *args: Any) -> Any: ...
        def notify(self, *args: Any, **kwargs: Any) -> None: ...
        def sync(self, *, follow_playhead: bool = True) -> None: ...
        def move_to(self, position: int, *, anchor: bool = True) -> None: ...

    # -- filter and search -----------------------------------------------------------------

    def action_focus_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_focus_list(self) -> None:
        search = self.query_one("#search", Input)
        if not search.value:
            search.remove_class("-shown")
        self.view.focus()

    def action_toggle_details(self) -> None:
        self.query_one(ReplayDetail).toggle_class("-hidden")

    def on_filter_bar_applied(self, message: FilterBar.Applied) -> None:
        self.store.apply_filter(message.matcher)
        self.sync(follow_playhead=False)
        if message.submitted:
            self.view.focus()

    def action_search(self) -> None:
        search = self.query_one("#search", Input)
        search.add_class("-shown")
        search.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "search":
            return
        event.stop()
        self.search(event.value)

    def search(self, text: str) -> None:
        """Show only flows whose bodies or headers hold ``text`` (empty: all flows)."""
        self.search_text = text.strip()
        if not self.search_text:
            self._searched("", None)
            return
        self._search_worker(self.search_text)

    @work(thread=True, exclusive=True, group="search")
    def _search_worker(self, text: str) -> None:
        with Recording.open(self.replay_app.path) as recording:
            hits = search_flows(recording, self.timeline, text)
        self.app.call_from_thread(self._searched, text, hits)

    def _searched(self, text: str, hits: set[str] | None) -> None:
        if text != self.search_text:
            return  # a newer search is running
        self.store.set_search(hits)
        self.sync(follow_playhead=False)
        if hits is None:
            self.query_one("#search", Input).remove_class("-shown")
        else:
            flows = [self.store.get(rid) for rid in hits]
            later = sum(1 for flow in flows if flow is not None and not self.store.begun(flow))
            note = f" ({later} after the playhead: G shows all)" if later else ""
            self.notify(f"{len(hits)} flow(s) contain “{text}”{note}", markup=False)
        self.view.focus()

    # -- seek, what-if, export -------------------------------------------------------------

    def action_seek(self) -> None:
        def check(text: str) -> str | None:
            try:
                parse_seek(text, self.timeline, utc=self.replay_app.utc)
            except ValueError as exc:
                return str(exc)
            return None

        def done(text: str | None) -> None:
            if text is not None:
                self.move_to(parse_seek(text, self.timeline, utc=self.replay_app.utc))

        self.app.push_screen(
            PromptScreen(
                "Seek",
                "14:03:07 (clock time as shown)  ·  +90 or +1m30s from the start  ·  seq 120",
                check=check,
                id="seek-prompt",
            ),
            done,
        )

    def action_what_if(self) -> None:
        self.replay_app.ask_what_if(self)

    def show_what_if(self, source: str, rows: list[Any]) -> None:
        def done(position: int | None) -> None:
            if position is not None:
                self.move_to(position)

        self.app.push_screen(WhatIfScreen(source, rows), done)

    def action_export(self, scope: str) -> None:
        flow = self.view.selected
        if scope == "flow" and flow is None:
            self.notify("No flow is selected.", markup=False)
            return
        name = flow.request_id if scope == "flow" and flow is not None else self.timeline.info.id
        default = self.replay_app.cwd / f"sluice-{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}.har"

        def check(text: str) -> str | None:
            target = Path(text).expanduser()
            if not text.strip():
                return "give a file name"
            if target.exists() or target.is_symlink():
                return f"{target} exists; choose another name"
            if not target.parent.is_dir():
                return f"no such directory: {target.parent}"
            return None

        def done(text: str | None) -> None:
            if text is not None:
                rid = flow.request_id if scope == "flow" and flow is not None else None
                self._export_worker(Path(text).expanduser(), rid)

        what = f"flow {name}" if scope == "flow" else f"session {name}"
        self.app.push_screen(
            PromptScreen(f"Export {what} to HAR 1.2", "file to write", str(default), check),
            done,
        )

    @work(thread=True, group="export")
    def _export_worker(self, target: Path, request_id: str | None) -> None:
        from proxy.recording.files import write_new_private
        from proxy.recording.har import build_har

        try:
            with Recording.open(self.replay_app.path) as recording:
                flow = recording.flow(request_id) if request_id else None
                flows = [flow] if flow else recording.flows(self.timeline.info.id)
                har = build_har(recording, flows)
            data = json.dumps(har, indent=1, ensure_ascii=False).encode("utf-8") + b"\n"
            write_new_private(target, data)
        except Exception as exc:  # shown to the person; the replay goes on
            self.app.call_from_thread(
                self.notify, f"HAR export failed: {exc}", severity="error", markup=False
            )
            return
        count = len(har["log"]["entries"])
        self.app.call_from_thread(
            self.notify, f"Wrote {count} HAR entries to {target}", title="Exported", markup=False
        )
