"""``sluice replay PATH``: recorded sessions, offline, with no proxy running.

Opening reads only the reader's cached index (a 1 GiB recording opens in well under a
second); ``verify`` then checks the hash chain and signatures in a thread while the
sessions are already on screen, and the integrity column and banner fill in when it is
done. A directory, or a file holding several sessions, opens the sessions browser; a
file with one session (or ``--session``) opens it directly.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Static

from console.flowview import FlowView
from console.help import HelpScreen
from console.render import local_clock, plain, utc_clock
from console.replay_model import Integrity, Timeline, integrity_of
from console.replay_screen import ReplayScreen
from console.replay_screens import PromptScreen, SessionsScreen, WhatIfScreen
from console.replay_views import IntegrityBanner, ReplayFlowView, SessionList
from proxy.recording import FileResult, Recording, SessionSummary
from proxy.recording.keys import public_pem

PALETTE = Binding("ctrl+p", "command_palette", "Command palette", id="app.palette")


class ReplayApp(App[int]):
    TITLE = "Sluice replay"
    BINDINGS = [
        Binding("question_mark", "help", "Help", key_display="?", id="app.help"),
        Binding("q", "quit", "Quit", id="app.quit"),
    ]

    def __init__(
        self,
        path: Path | str,
        *,
        session: str | None = None,
        utc: bool = False,
        public_key: Any = None,
        cwd: Path | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.path = Path(path)
        self.wanted_session = session
        self.utc = utc
        self.row_clock = utc_clock if utc else local_clock
        self.detail_clock: Callable[[float], str] | None = (
            (lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC")
            if utc
            else None
        )
        self.public_key = public_key
        self.cwd = cwd or Path.cwd()
        self.monotonic = monotonic
        self.recording: Recording = None  # type: ignore[assignment]  # set once opened
        self.sessions: list[SessionSummary] = []
        self.results: list[FileResult] | None = None
        self.verify_error: str | None = None
        self.whatif_config: Any = None
        self.whatif_path = ""
        self.exit_code = 0
        self._verifier: subprocess.Popen[bytes] | None = None

    def shown_path(self, text: str) -> str:
        """A path as typed, relative to the working directory when it is inside it."""
        path = Path(text).expanduser().absolute()
        return str(path.relative_to(self.cwd)) if path.is_relative_to(self.cwd) else str(path)

    @property
    def source_name(self) -> str:
        return self.path.name or str(self.path)

    def precise_clock(self, ts: float) -> str:
        """Date and time to the millisecond, in the zone the view uses."""
        moment = (time.gmtime if self.utc else time.localtime)(ts)
        zone = " UTC" if self.utc else ""
        return time.strftime("%Y-%m-%d %H:%M:%S", moment) + f".{round(ts * 1000) % 1000:03d}{zone}"

    def compose(self) -> ComposeResult:
        yield Static(Text(f"Opening {plain(self.path)} …"), id="opening")
        yield Footer()

    def on_mount(self) -> None:
        self._open_worker()

    # -- opening ---------------------------------------------------------------------------

    @work(thread=True, group="open")
    def _open_worker(self) -> None:
        try:
            recording = Recording.open(self.path)
            sessions = recording.sessions()
        except Exception as exc:  # an unreadable path is shown, not raised
            self.call_from_thread(self._open_failed, f"{type(exc).__name__}: {exc}")
            return
        self.call_from_thread(self._opened, recording, sessions)

    def _open_failed(self, reason: str) -> None:
        self.exit_code = 1
        self.query_one("#opening", Static).update(Text(f"Cannot open {self.path}: {reason}"))

    def _opened(self, recording: Recording, sessions: list[SessionSummary]) -> None:
        self.recording, self.sessions = recording, sessions
        self._verify_worker()
        if not sessions:
            self.query_one("#opening", Static).update(
                Text(f"No sessions are recorded in {self.path}.")
            )
            return
        wanted = self.wanted_session
        if wanted is not None:
            chosen = next((s for s in sessions if s.id == wanted), None)
            if chosen is None:
                self.notify(f"No session {wanted!r} here.", severity="error", markup=False)
            else:
                self.open_session(chosen)
                return
        if self.path.is_file() and len(sessions) == 1:
            self.open_session(sessions[0])
            return
        self.push_screen(self._browser())

    def _browser(self) -> SessionsScreen:
        counts = self.recording.counts
        title = Text(" SLUICE REPLAY ", style="bold reverse")
        title.append(f" {plain(self.source_name)}  ")
        title.append(
            f"{len(self.sessions)} session(s), {counts.get('records', 0):,} records, "
            f"{len(self.recording.files)} file(s)",
            "dim",
        )
        title.append("\n Enter opens the highlighted session.", "dim")
        return SessionsScreen(title, self.sessions, self.row_clock_full)

    def row_clock_full(self, ts: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", (time.gmtime if self.utc else time.localtime)(ts))

    def on_session_list_chosen(self, message: SessionList.Chosen) -> None:
        self.open_session(message.session)

    def open_session(self, summary: SessionSummary) -> None:
        self._load_worker(summary)

    @work(thread=True, exclusive=True, group="load")
    def _load_worker(self, summary: SessionSummary) -> None:
        with Recording.open(self.path) as recording:
            timeline = Timeline.build(summary.id, recording.session_records(summary.id))
        self.call_from_thread(self._loaded, summary, timeline)

    def _loaded(self, summary: SessionSummary, timeline: Timeline) -> None:
        while isinstance(self.screen, ReplayScreen | PromptScreen | WhatIfScreen):
            self.pop_screen()  # one session at a time, above the browser if there is one
        self.push_screen(ReplayScreen(timeline, summary, self.integrity_for(summary)))

    # -- integrity -------------------------------------------------------------------------

    @work(thread=True, group="verify")
    def _verify_worker(self) -> None:
        """Verify in a child process, so hashing a large recording does not starve the UI
        of the GIL; the child is ended if the app quits first."""
        from console.replay_verify import decode

        pem = public_pem(self.public_key) if self.public_key is not None else b""
        command = [sys.executable, "-m", "console.replay_verify", *map(str, self.recording.files)]
        root, python_path = (
            str(Path(__file__).resolve().parent.parent),
            os.environ.get("PYTHONPATH"),
        )
        try:
            child = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={
                    **os.environ,
                    "PYTHONPATH": os.pathsep.join(filter(None, [root, python_path])),
                },
            )
            self._verifier = child
            out, err = child.communicate(pem)
            if child.returncode != 0:
                reason = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["stopped"]
                raise RuntimeError(f"verify exited {child.returncode}: {reason[0]}")
            results = decode(out.decode("utf-8"))
        except Exception as exc:  # shown in the banner as "integrity unknown"
            results, error = None, f"{type(exc).__name__}: {exc}"
        else:
            error = None
        with contextlib.suppress(RuntimeError):  # the app quit (and ended the child) first
            self.call_from_thread(self._verified, results, error)

    def on_unmount(self) -> None:
        child = self._verifier
        if child is not None and child.poll() is None:
            child.terminate()  # the verifier this app started; nothing else

    def integrity_for(self, summary: SessionSummary | None) -> Integrity | None:
        if self.verify_error is not None:
            return Integrity("error", reason=self.verify_error)
        if self.results is None:
            return None
        return integrity_of(self.results, summary.files if summary is not None else None)

    def _verified(self, results: list[FileResult] | None, error: str | None) -> None:
        self.results, self.verify_error = results, error
        for screen in self.screen_stack:
            self.apply_integrity(screen)

    def apply_integrity(self, screen: Screen[Any]) -> None:
        """Show what verify said on ``screen``; a screen not composed yet asks on mount."""
        if isinstance(screen, ReplayScreen):
            screen.set_integrity(self.integrity_for(screen.summary))
            return
        if not isinstance(screen, SessionsScreen):
            return
        if self.results is None and self.verify_error is None:
            return
        states = {s.id: getattr(self.integrity_for(s), "state", "?") for s in self.sessions}
        try:
            screen.query_one(SessionList).set_states(states)
            screen.query_one(IntegrityBanner).show(self.integrity_for(None))
        except NoMatches:
            pass  # not composed yet: its on_mount calls this again

    def action_integrity(self) -> None:
        if self.results is None and self.verify_error is None:
            self.notify("Still checking the recording…", markup=False)
            return
        lines = [self.verify_error] if self.verify_error else [r.describe() for r in self.results]
        self.notify("\n".join(lines), title="verify", timeout=15, markup=False)

    # -- what-if ---------------------------------------------------------------------------

    def ask_what_if(self, screen: ReplayScreen) -> None:
        guess = self.whatif_path or (
            str(self.cwd / "sluice.toml") if (self.cwd / "sluice.toml").exists() else ""
        )

        def check(text: str) -> str | None:
            from proxy.config import ConfigError, load_config

            if not text.strip():
                return "give the path of a config file"
            try:
                self.whatif_config = load_config(Path(text).expanduser())
            except ConfigError as exc:
                return f"the config is not valid:\n{exc}"
            self.whatif_path = text
            return None

        def done(text: str | None) -> None:
            if text is not None:
                self._what_if_worker(screen, self.whatif_config, self.shown_path(text))

        self.push_screen(
            PromptScreen(
                "What-if: decide every recorded request of this session with another config",
                "config file (TOML); the recorded requests are evaluated by its policy",
                guess,
                check,
                id="whatif-prompt",
            ),
            done,
        )

    @work(thread=True, group="whatif")
    def _what_if_worker(self, screen: ReplayScreen, config: Any, source: str) -> None:
        from console.replay_whatif import what_if

        try:
            with Recording.open(self.path) as recording:
                rows = what_if(recording, screen.timeline, config)
        except Exception as exc:  # shown to the person; the replay goes on
            self.call_from_thread(
                self.notify, f"what-if failed: {exc}", severity="error", markup=False
            )
            return
        self.call_from_thread(screen.show_what_if, source, rows)

    # -- navigation, help, palette ---------------------------------------------------------

    async def action_quit(self) -> None:
        self.exit(self.exit_code)

    def action_sessions(self) -> None:
        if any(isinstance(s, SessionsScreen) for s in self.screen_stack):
            while not isinstance(self.screen, SessionsScreen):
                self.pop_screen()
        elif self.sessions:
            while isinstance(self.screen, ReplayScreen):  # opened directly: replace it
                self.pop_screen()
            self.push_screen(self._browser())

    def action_help(self) -> None:
        self.push_screen(
            HelpScreen(
                [
                    ("Replay", list(ReplayScreen.BINDINGS)),
                    ("Flow list", [*ReplayFlowView.BINDINGS, *FlowView.BINDINGS]),
                    ("Sessions browser", [*SessionsScreen.BINDINGS, *SessionList.BINDINGS]),
                    ("What-if results", list(WhatIfScreen.BINDINGS)),
                    ("Everywhere", [*self.BINDINGS, PALETTE]),
                ]
            )
        )

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        replay = next((s for s in reversed(self.screen_stack) if isinstance(s, ReplayScreen)), None)
        if replay is not None:
            yield from _replay_commands(replay)
        if self.sessions:
            yield SystemCommand("Sessions", "Open the sessions browser (o)", self.action_sessions)
        yield SystemCommand("Integrity", "What verify says of each file (v)", self.action_integrity)
        yield SystemCommand("Keys", "Show every key (?)", self.action_help)
        yield from super().get_system_commands(screen)


def _replay_commands(s: ReplayScreen) -> Iterable[SystemCommand]:
    yield SystemCommand("Play / pause", "Replay at the current speed (space)", s.action_play)
    for speed in (1, 4, 16):
        label = "recorded speed" if speed == 1 else f"{speed}x the recorded speed"
        yield SystemCommand(f"Play at {speed}x", f"Replay at {label}", lambda v=speed: s.play_at(v))
    yield SystemCommand("Step forward", "Next event (→)", lambda: s.action_step(1))
    yield SystemCommand("Step back", "Previous event (←)", lambda: s.action_step(-1))
    for name, key in (("denied", "d"), ("held", "h"), ("masked", "m"), ("failed", "f")):
        yield SystemCommand(
            f"Next {name}",
            f"Jump to the next {name} event ({key})",
            lambda n=name: s.action_jump(n, 1),
        )
        yield SystemCommand(
            f"Previous {name}",
            f"Jump to the previous {name} event ({key.upper()})",
            lambda n=name: s.action_jump(n, -1),
        )
    yield SystemCommand("First event", "Go to the session's start (g)", lambda: s.action_edge(-1))
    yield SystemCommand("Last event", "Go to the session's end (G)", lambda: s.action_edge(1))
    yield SystemCommand("Seek to a time", "Clock time, +offset or seq (t)", s.action_seek)
    yield SystemCommand("Search bodies and headers", "Find flows by content (s)", s.action_search)
    yield SystemCommand("Filter flows", "The live filter language (/)", s.action_focus_filter)
    yield SystemCommand("What-if", "Decide every request with another config (w)", s.action_what_if)
    yield SystemCommand(
        "Export session to HAR",
        "Write the session as HAR 1.2 (e)",
        lambda: s.action_export("session"),
    )
    yield SystemCommand(
        "Export flow to HAR", "Write the selected flow as HAR (E)", lambda: s.action_export("flow")
    )
    yield SystemCommand("Next masked region", "In the detail pane (r)", lambda: s.action_region(1))
    yield SystemCommand("Toggle details", "Show or hide the details (i)", s.action_toggle_details)
