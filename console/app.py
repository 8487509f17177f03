"""The Sluice console: live flows, filter, details, approvals, all over the admin API.

Events are queued as they arrive and applied on a 50 ms timer (one refresh per batch,
never one message per event). The proxy runs in its own process; this app only talks
HTTP to it through ``AdminClient``, so a stalled UI never stalls traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Input

from console.approvals_ui import ApprovalPanel, ApprovalPrompt, Verdict
from console.client import AdminClient, ConnChange, ConnState, EventStream
from console.detail import DetailPane
from console.filterbar import FilterBar
from console.flow_detail import AdminDetails, DetailSource, FlowDetail
from console.flowview import FlowView
from console.header import Banner, StatusHeader
from console.help import HelpScreen
from console.model import DEFAULT_MAX_FLOWS, Approvals, Flow, FlowStore
from console.render import local_clock, plain
from proxy.matcher import Matcher

TICK_SECONDS = 0.05
_DONE = {"approve": "Approved", "deny": "Denied"}
HEALTH_SECONDS = 5.0
SNAPSHOT_FLOWS = 2000
_GUARDED_INPUT = (events.Key, events.MouseDown, events.MouseUp, events.Click)


class SluiceConsole(App[int]):
    TITLE = "Sluice console"
    CSS = """
    Screen { layout: vertical; }
    FlowView { height: 1fr; }
    """
    BINDINGS = [
        Binding("slash", "focus_filter", "Filter", id="app.filter"),
        Binding("escape", "focus_list", "Back to list", show=False, id="app.list"),
        Binding("i", "toggle_details", "Details", id="app.details"),
        Binding("p", "review", "Approvals", id="app.approvals"),
        Binding("question_mark", "help", "Help", key_display="?", id="app.help"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(
        self,
        client: AdminClient | None = None,
        *,
        max_flows: int = DEFAULT_MAX_FLOWS,
        row_clock: Callable[[float], str] = local_clock,
        detail_clock: Callable[[float], str] | None = None,
        now: Callable[[], float] = time.time,
        tick_seconds: float = TICK_SECONDS,
        url: str = "",
        detail_source: DetailSource | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.store = FlowStore(max_flows)
        self.approvals = Approvals()
        self.now = now
        self.row_clock = row_clock
        self.detail_clock = detail_clock
        self.tick_seconds = tick_seconds
        self.url = url or (client.base_url if client else "")
        #: Where headers and bodies come from: the proxy's admin API unless told otherwise.
        self.detail_source = detail_source or (AdminDetails(client) if client else None)
        self._detail: tuple[int, FlowDetail] | None = None
        self._queue: list[dict[str, Any]] = []
        self._stream: EventStream | None = None
        self._prompt: ApprovalPrompt | None = None
        self._deferred: set[str] = set()
        self._sent: set[str] = set()
        self._connected_once = False
        self._gap = False
        self._changes_seen = -1
        #: Reconnect delays: first retry, then doubling up to the second value.
        self.client_backoff = (0.25, 5.0)
        #: Verdicts decided while no client is attached (tests, demos).
        self.verdicts: list[Verdict] = []

    # -- layout ---------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield StatusHeader(id="header")
        yield Banner(id="banner")
        yield FilterBar(id="filterbar")
        yield FlowView(self.store, clock=self.row_clock, id="flows")
        yield DetailPane(id="detail")
        yield ApprovalPanel(now=self.now, id="approvals")
        yield Footer()

    @property
    def _main(self) -> Screen[Any]:
        """The live view's screen: timers and workers run while a prompt is on top."""
        return self.screen_stack[0]

    @property
    def view(self) -> FlowView:
        return self._main.query_one(FlowView)

    def on_mount(self) -> None:
        self._main.query_one(DetailPane).clock = self.detail_clock
        self._main.query_one(StatusHeader).status.url = self.url
        self.view.focus()
        self.set_interval(self.tick_seconds, self._tick)
        if self.client is not None:
            self._stream = self.client.stream(
                self.feed,
                self.set_connection,
                on_gap=self._on_gap,
                on_health=self.set_health,
                backoff=self.client_backoff,
            )
            self.run_worker(self._stream.run(), name="events", group="stream", exit_on_error=False)
            self.set_interval(HEALTH_SECONDS, self._poll_health)

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.close()

    # -- input guard ----------------------------------------------------------------------

    async def on_event(self, event: events.Event) -> None:
        """Keys and clicks in a prompt's first half second never reach anything."""
        if isinstance(event, _GUARDED_INPUT) and not event.is_forwarded:
            screen = self.screen_stack[-1] if self.screen_stack else None
            if isinstance(screen, ApprovalPrompt) and screen.guarded:
                event.stop()
                event.prevent_default()
                return
        await super().on_event(event)

    # -- events in ------------------------------------------------------------------------

    def feed(self, batch: Iterable[dict[str, Any]]) -> None:
        """Queue events (admin API dicts); applied on the next tick."""
        self._queue.extend(batch)

    def set_connection(self, change: ConnChange) -> None:
        status = self._main.query_one(StatusHeader)
        status.status.conn = change
        status.refresh()
        self._main.query_one(Banner).show(change)
        if change.state is ConnState.CONNECTED and self.client is not None:
            first = not self._connected_once
            self._connected_once = True
            self.run_worker(self._resync(flows=first or self._gap), group="resync")
            self._gap = False

    def set_health(self, health: dict[str, Any]) -> None:
        header = self._main.query_one(StatusHeader)
        header.status.health = health
        header.refresh()

    def _on_gap(self) -> None:
        self._gap = True
        if self._stream is not None and self._stream.state is ConnState.CONNECTED:
            self.run_worker(self._resync(flows=True), group="resync")
            self._gap = False

    async def _resync(self, *, flows: bool) -> None:
        """Fetch what events cannot replay: the pending queue, and recent flows."""
        assert self.client is not None
        try:
            self.approvals.replace(await self.client.approvals())
            if flows:
                limit = min(self.store.max_flows, SNAPSHOT_FLOWS)
                self.store.merge_snapshot(await self.client.flows(limit))
        except Exception as exc:  # a failed resync is retried at the next connect
            self.notify(f"resync failed: {exc}", severity="warning", markup=False)
        self._changes_seen = -1

    async def _poll_health(self) -> None:
        if self.client is None or self._stream is None:
            return
        if self._stream.state is not ConnState.CONNECTED:
            return
        try:
            self.set_health(await self.client.health())
        except Exception:  # the stream reports the connection state; nothing to add here
            return

    def _tick(self) -> None:
        """Apply everything queued since the last tick, then refresh once."""
        try:
            header = self._main.query_one(StatusHeader).status
        except NoMatches:  # a tick that fires while the app tears its widgets down
            return
        batch, self._queue = self._queue, []
        held: list[dict[str, Any]] = []
        closed: list[dict[str, Any]] = []
        for event in batch:
            kind = str(event.get("type", ""))
            if kind.startswith("request."):
                self.store.apply(event)
            elif kind.startswith("approval."):
                what = self.approvals.apply(event)
                self.store.apply_approval(event)
                (held if what == "requested" else closed).append(event)
            elif kind == "config.reload_failed":
                header.reload_error = str(event.get("error", "rejected"))
            elif kind == "config.reloaded":
                header.reload_error = None
                if isinstance(header.health.get("config"), dict):
                    header.health["config"]["last_error"] = None  # until the next poll
                restart = event.get("needs_restart") or []
                header.reload_note = f"reloaded: {event.get('rules', '?')} rules" + (
                    f" (restart needed for {', '.join(map(str, restart))})" if restart else ""
                )
        if self.store.rebuilding:
            self.store.step()
        if batch or self.store.changes != self._changes_seen:
            self._changes_seen = self.store.changes
            self._refresh_all()
        for event in closed:
            self._approval_closed(event)
        if held:
            self.bell()
            first = held[0]
            self.notify(
                f"Held for approval: {plain(first.get('method'))} {plain(first.get('target'))} "
                f"{plain(first.get('path'))} ({plain(first.get('rule'))})"
                + (f" and {len(held) - 1} more" if len(held) > 1 else ""),
                title="Approval needed",
                severity="warning",
                markup=False,
            )
        self._maybe_prompt()

    def _refresh_all(self) -> None:
        view = self.view
        view.refresh_view()
        header = self._main.query_one(StatusHeader)
        status = header.status
        status.flows, status.shown = len(self.store), self.store.visible_count
        status.denied, status.seen = self.store.denied_total, self.store.seen_total
        status.pending, status.filtering = len(self.approvals.pending), self.store.rebuilding
        header.refresh()
        self._show_detail(view.selected)
        self._main.query_one(ApprovalPanel).show(list(self.approvals.pending.values()))

    def on_flow_view_highlighted(self, message: FlowView.Highlighted) -> None:
        self._show_detail(message.flow)

    def _show_detail(self, flow: Flow | None) -> None:
        pane = self._main.query_one(DetailPane)
        loaded = self._detail
        if flow is not None and loaded is not None and loaded[0] == flow.n:
            pane.show(flow, detail=loaded[1])
            return
        finished = flow is not None and flow.state in ("completed", "failed")
        if self.detail_source is None or not finished:
            pane.show(flow, detail=None)
            return
        assert flow is not None
        pane.show(flow, detail=None)
        self.run_worker(self._load_detail(flow), group="detail", exclusive=True)

    async def _load_detail(self, flow: Flow) -> None:
        assert self.detail_source is not None
        try:
            detail = await self.detail_source.detail(flow)
        except Exception as exc:  # a source failing must not take the console down
            detail = FlowDetail(unavailable=f"{type(exc).__name__}: {exc}")
        self._detail = (flow.n, detail)
        if self.view.selected is flow:
            self._show_detail(flow)

    # -- approvals ------------------------------------------------------------------------

    def _approval_closed(self, event: dict[str, Any]) -> None:
        approval_id = str(event.get("id"))
        self._deferred.discard(approval_id)
        ours = approval_id in self._sent
        self._sent.discard(approval_id)
        prompt = self._prompt
        if ours or prompt is None or prompt.approval_id != approval_id:
            return
        by = event.get("decided_by") or "nobody"
        state = event.get("state", "closed")
        self.notify(
            f"{approval_id} was {state} by {plain(by)}"
            + (f": {plain(event.get('decision_reason'))}" if event.get("decision_reason") else ""),
            title="Decided elsewhere",
            markup=False,
        )
        prompt.closed_elsewhere(event)

    def _maybe_prompt(self) -> None:
        if self._prompt is not None:
            return
        for summary in self.approvals.pending.values():
            if summary["id"] not in self._deferred and summary["id"] not in self._sent:
                self.open_prompt(summary)
                return

    def open_prompt(self, summary: dict[str, Any]) -> None:
        prompt = ApprovalPrompt(summary, now=self.now)
        self._prompt = prompt
        self.push_screen(prompt, callback=self._prompt_done)

    def _prompt_done(self, verdict: Verdict | None) -> None:
        prompt, self._prompt = self._prompt, None
        if verdict is None:
            if prompt is not None and prompt.approval_id in self.approvals.pending:
                self._deferred.add(prompt.approval_id)
            return
        self._sent.add(verdict.approval_id)
        self.run_worker(self._send(verdict), group="decide")

    async def _send(self, verdict: Verdict) -> None:
        if self.client is None:
            self.verdicts.append(verdict)
            return
        result = await self.client.decide(
            verdict.approval_id, verdict.decision, verdict.scope, verdict.reason
        )
        if result.ok:
            self.notify(
                f"{_DONE.get(verdict.decision, verdict.decision)} {verdict.approval_id} "
                f"({verdict.scope})"
                + (
                    f"; rule {result.summary.get('learned_rule')}"
                    if verdict.scope == "always"
                    else ""
                ),
                markup=False,
            )
        elif result.status == 409:
            self.notify(
                f"{verdict.approval_id} was already decided by "
                f"{plain(result.conflict_by or 'someone else')} "
                f"({plain(result.summary.get('state', 'closed'))})",
                title="Too late",
                severity="warning",
                markup=False,
            )
        else:
            self._sent.discard(verdict.approval_id)
            self.notify(f"decision not recorded: {result.error}", severity="error", markup=False)

    # -- actions --------------------------------------------------------------------------

    def action_focus_filter(self) -> None:
        self._main.query_one("#filter", Input).focus()

    def action_focus_list(self) -> None:
        self.view.focus()

    def action_toggle_details(self) -> None:
        self._main.query_one(DetailPane).toggle_class("-hidden")

    def action_review(self) -> None:
        self._deferred.clear()
        if self._prompt is None and self.approvals.pending:
            self._maybe_prompt()
        elif not self.approvals.pending:
            self.notify("No approvals are pending.")

    def action_follow(self) -> None:
        self.view.action_follow()

    def action_clear_filter(self) -> None:
        self._main.query_one("#filter", Input).value = ""
        self.apply_filter("")

    def action_help(self) -> None:
        self.push_screen(
            HelpScreen(
                [
                    ("Console", list(self.BINDINGS)),
                    ("Flow list", list(FlowView.BINDINGS)),
                    ("Approval prompt", list(ApprovalPrompt.BINDINGS)),
                    ("Everywhere", [Binding("ctrl+p", "command_palette", "Command palette")]),
                ]
            )
        )

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield SystemCommand("Filter flows", "Focus the filter bar (/)", self.action_focus_filter)
        yield SystemCommand("Clear filter", "Show every flow", self.action_clear_filter)
        yield SystemCommand("Follow newest", "Scroll to and follow new flows", self.action_follow)
        yield SystemCommand(
            "Toggle details", "Show or hide the detail pane (i)", self.action_toggle_details
        )
        yield SystemCommand(
            "Review approvals", "Open the oldest pending approval (p)", self.action_review
        )
        yield SystemCommand("Keys", "Show every key (?)", self.action_help)
        yield from super().get_system_commands(screen)

    # -- filter ---------------------------------------------------------------------------

    def on_filter_bar_applied(self, message: FilterBar.Applied) -> None:
        self._set_matcher(message.matcher)
        if message.submitted:
            self.view.focus()

    def _set_matcher(self, matcher: Matcher | None) -> None:
        self.store.set_filter(matcher)
        self.store.step()
        self._refresh_all()

    def apply_filter(self, text: str) -> bool:
        """Filter now (the bar shows an error inline and keeps the last good filter)."""
        ok, matcher = self._main.query_one(FilterBar).compile(text)
        if ok:
            self._set_matcher(matcher)
        return ok
