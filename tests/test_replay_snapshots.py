"""Snapshots of ``sluice replay`` (pytest-textual-snapshot) on a real demo recording.

The recording comes from a real proxy run, normalized (fixed times, ids, ports, random
secrets and signing key; re-chained and re-signed) so every run draws the same screen.
Times are shown in UTC. After an intended change of the UI, review and accept with
``pytest tests/test_replay_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_replay_support import demo_run, flipped_config, normalized_copy, tampered_copy, url_seq
from textual.pilot import Pilot
from textual.widgets import Input
from textual.widgets._footer import FooterKey

from console.replay_app import ReplayApp
from console.replay_screen import ReplayScreen
from console.replay_screens import PromptScreen, SessionsScreen, WhatIfScreen
from console.replay_views import ReplayFlowView, SessionList

SIZE = (130, 44)


def recording(tmp_path: Path) -> Path:
    return normalized_copy(demo_run().recordings, tmp_path / "recordings")


async def wait(pilot: Pilot[Any], check: Any, rounds: int = 200) -> None:
    for _ in range(rounds):
        if check():
            return
        await pilot.pause(0.05)
    raise AssertionError("the app did not get there")


async def open_session(pilot: Pilot[Any]) -> ReplayScreen:
    app = pilot.app
    await wait(pilot, lambda: isinstance(app.focused, SessionList))
    await pilot.press("enter")
    await wait(pilot, lambda: isinstance(app.focused, ReplayFlowView))
    screen = app.screen
    assert isinstance(screen, ReplayScreen)
    await wait(pilot, lambda: screen.integrity is not None)
    await drawn(pilot)
    return screen


async def drawn(pilot: Pilot[Any]) -> None:
    """The footer fills in its keys after the screen mounts: wait for it (a busy machine
    otherwise snapshots a blank footer)."""
    app = pilot.app
    await wait(pilot, lambda: len(app.screen.query(FooterKey)) > 0)
    await pilot.wait_for_scheduled_animations()
    await pilot.pause(0.1)


def test_sessions_browser(snap_compare: Any, tmp_path: Path) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await wait(pilot, lambda: isinstance(app.screen, SessionsScreen))
        await wait(pilot, lambda: app.screen.query_one(SessionList).states)
        await drawn(pilot)

    app = ReplayApp(recording(tmp_path), utc=True, cwd=tmp_path)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_replay_at_a_masked_region(snap_compare: Any, tmp_path: Path) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await open_session(pilot)
        await pilot.press("g", "m")
        await pilot.pause(0.1)

    app = ReplayApp(recording(tmp_path), utc=True, cwd=tmp_path)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_replay_midway_after_stepping(snap_compare: Any, tmp_path: Path) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await open_session(pilot)
        await pilot.press("g", "h", "right", "right")  # the held push, then its approval
        await pilot.pause(0.1)

    app = ReplayApp(recording(tmp_path), utc=True, cwd=tmp_path)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_tampered_recording(snap_compare: Any, tmp_path: Path) -> None:
    clean = recording(tmp_path / "clean")
    bad = tampered_copy(
        clean, tmp_path / "recordings", url_seq(clean, "/api/builds/latest"), b"User-Agent"
    )

    async def run_before(pilot: Pilot[Any]) -> None:
        await open_session(pilot)
        await pilot.pause(0.1)

    app = ReplayApp(bad, utc=True, cwd=tmp_path)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_what_if_results(snap_compare: Any, tmp_path: Path) -> None:
    config = flipped_config(demo_run().config, tmp_path / "open.toml")

    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        await open_session(pilot)
        await pilot.press("w")
        await wait(pilot, lambda: isinstance(app.screen, PromptScreen))
        app.screen.query_one(Input).value = str(config)
        await pilot.press("enter")
        await wait(pilot, lambda: isinstance(app.screen, WhatIfScreen))
        await drawn(pilot)

    app = ReplayApp(recording(tmp_path), utc=True, cwd=tmp_path)
    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
