"""``sluice replay`` driven headless with Pilot, on recordings made by a real proxy.

Opened from a directory (sessions browser) and from a file; stepped and jumped; a masked
region highlighted with its rule and fingerprint; a tampered copy's banner and untrusted
rows; what-if through the prompt with a config that flips decisions; search, filter,
seek, play, HAR export, help and the command palette.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from test_replay_support import demo_run, flipped_config, incident_run, tampered_copy, url_seq
from textual.pilot import Pilot
from textual.widgets import DataTable, Input

from console.replay_app import ReplayApp
from console.replay_detail import SELECTED_STYLE, ReplayDetail
from console.replay_screen import ReplayScreen
from console.replay_screens import PromptScreen, SessionsScreen, WhatIfScreen
from console.replay_views import IntegrityBanner, ReplayFlowView, SessionList

pytestmark = pytest.mark.asyncio
SIZE = (140, 50)


async def until(pilot: Pilot[Any], check: Callable[[], Any], seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"condition not met within {seconds}s")


async def opened(pilot: Pilot[Any]) -> ReplayScreen:
    """Wait for the replay screen (opening a session from the browser if needed)."""
    app = pilot.app
    await until(pilot, lambda: isinstance(app.screen, SessionsScreen | ReplayScreen))
    if isinstance(app.screen, SessionsScreen):
        await browser_ready(pilot)
        await pilot.press("enter")
    screen = await ready(pilot)
    await until(pilot, lambda: screen.integrity is not None)
    return screen


async def browser_ready(pilot: Pilot[Any]) -> SessionsScreen:
    """The sessions browser, mounted with its list focused."""
    app = pilot.app

    def mounted() -> SessionsScreen | None:
        screen = app.screen
        if isinstance(screen, SessionsScreen) and isinstance(app.focused, SessionList):
            return screen
        return None

    return await until(pilot, mounted)


async def ready(pilot: Pilot[Any]) -> ReplayScreen:
    """The replay screen, mounted with its list focused (keys before that are lost)."""
    app = pilot.app

    def mounted() -> ReplayScreen | None:
        screen = app.screen
        if isinstance(screen, ReplayScreen) and screen.is_mounted:
            return screen if isinstance(app.focused, ReplayFlowView) else None
        return None

    return await until(pilot, mounted)


def row_text(screen: ReplayScreen, path: str) -> str:
    view = screen.query_one(ReplayFlowView)
    for index in range(screen.store.visible_count):
        flow = screen.store.visible(index)
        if flow.path == path:
            strip = view._draw(flow, view.rich_style, 140)
            return "".join(segment.text for segment in strip)
    raise AssertionError(f"{path} is not in the list")


def detail_text(screen: ReplayScreen) -> str:
    items = screen.query_one(ReplayDetail).items
    return "\n".join(item.plain for item in items if isinstance(item, Text))


async def test_a_directory_opens_the_browser_then_the_session_at_its_end() -> None:
    app = ReplayApp(demo_run().recordings, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        browser = await browser_ready(pilot)
        sessions = browser.query_one(SessionList)
        await until(pilot, lambda: sessions.states)
        assert list(sessions.states.values()) == ["verified"]
        assert "VERIFIED" in browser.query_one(IntegrityBanner).text.plain
        screen = await opened(pilot)
        store = screen.store
        assert store.position == len(screen.timeline) - 1 and store.visible_count == 11
        assert "VERIFIED and signed" in screen.query_one(IntegrityBanner).text.plain
        assert "event 26/26" in screen.query_one("#replay-header").lines.plain


async def test_stepping_moves_the_playhead_and_the_selection() -> None:
    app = ReplayApp(demo_run().recordings, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        await pilot.press("g")
        assert screen.store.position == 0 and screen.store.visible_count == 0  # session.start
        # session.start, request (carrying its decision), response, the next request
        await pilot.press("right", "right", "right")
        assert screen.store.position == 3 and screen.store.visible_count == 2
        view = screen.query_one(ReplayFlowView)
        assert (
            view.selected is screen.store.current_flow()
            and view.selected.path == "/api/files/src/app.py"
        )
        assert "EVENT      seq 5 request" in detail_text(screen)
        await pilot.press("left")
        assert screen.store.position == 2 and screen.store.visible_count == 1
        assert view.selected.path == "/api/tree" and view.selected.status == 200
        await pilot.press("G")
        assert screen.store.position == len(screen.timeline) - 1
        await pilot.press("D")  # the previous denied event: the default deny of the DELETE
        assert (view.selected.method, view.selected.get("rule")) == ("DELETE", None)
        await pilot.press("D")  # and before it, the exfiltration attempt
        assert view.selected.get("rule") == "no-exfiltration"
        await pilot.press("h")  # no held event after it
        assert view.selected.get("rule") == "no-exfiltration"
        await pilot.press("H")
        assert view.selected.state == "held" and view.selected.path == "/api/push"


async def test_a_masked_region_is_highlighted_with_its_rule_and_fingerprint() -> None:
    app = ReplayApp(demo_run().recordings, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        await pilot.press("g", "m")
        flow = screen.query_one(ReplayFlowView).selected
        assert flow is not None and flow.path == "/api/builds/42/log"
        span = flow.get("mask_spans")[0]
        text = detail_text(screen)
        assert f"REGION      1 of 1   bytes {span['start']}-{span['end']}" in text
        assert f"rule github-pat  fingerprint {span['fingerprint']}" in text
        body = next(
            item
            for item in screen.query_one(ReplayDetail).items
            if isinstance(item, Text) and "GITHUB_TOKEN=" in item.plain
        )
        selected = [s for s in body.spans if s.style == SELECTED_STYLE]
        assert len(selected) == 1
        assert body.plain[selected[0].start : selected[0].end] == "ghp_" + "*" * 36
        assert "masked 1" in row_text(screen, "/api/builds/42/log")
        await pilot.press("r")  # one region: cycling stays on it
        assert "REGION      1 of 1" in detail_text(screen)


async def test_a_tampered_copy_shows_the_banner_and_untrusted_flows(tmp_path: Path) -> None:
    run = demo_run()
    seq = url_seq(run.recordings, "/api/builds/latest")
    copy = tampered_copy(run.recordings, tmp_path / "bad", seq, b"User-Agent")
    app = ReplayApp(copy, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        browser = await browser_ready(pilot)
        await until(pilot, lambda: browser.query_one(SessionList).states)
        assert list(browser.query_one(SessionList).states.values()) == ["tampered"]
        screen = await opened(pilot)
        banner = screen.query_one(IntegrityBanner)
        assert f"TAMPERED at seq {seq}: record {seq} was altered" in banner.text.plain
        assert banner.has_class("-bad")
        assert "UNTRUSTED" in row_text(screen, "/api/builds/latest")
        assert "UNTRUSTED" in row_text(screen, "/api/branches/main")
        assert "UNTRUSTED" not in row_text(screen, "/api/push")
        await pilot.press("g", "d")  # the first denied flow precedes the damage
        assert "UNTRUSTED" not in detail_text(screen)
        await pilot.press("G")
        assert f"recorded at or after seq {seq}" in detail_text(screen)


async def test_what_if_with_a_flipping_config_lists_changes_first_and_jumps(tmp_path: Path) -> None:
    run = demo_run()
    config = flipped_config(run.config, tmp_path / "open.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text(
        '[proxy]\nlisten = "nowhere"\n[[rules]]\nname = "[bold]x"\naction = "maybe"\n'
    )
    app = ReplayApp(run.recordings, utc=True, cwd=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        await pilot.press("w")
        prompt = await until(
            pilot, lambda: app.screen if isinstance(app.screen, PromptScreen) else 0
        )
        prompt.query_one(Input).value = str(broken)
        await pilot.press("enter")
        await pilot.pause(0.1)
        assert app.screen is prompt  # the error is shown, the prompt stays
        error = str(prompt.query_one("#prompt-error").render())
        assert "not valid" in error and "action" in error
        prompt.query_one(Input).value = str(config)
        await pilot.press("enter")
        results = await until(
            pilot, lambda: app.screen if isinstance(app.screen, WhatIfScreen) else 0
        )
        assert [(r.path, r.shown_recorded, r.shown_would) for r in results.rows[:2]] == [
            ("/api/files/.env", "deny", "allow"),
            ("/api/files/keys/deploy_key.pem", "deny", "allow"),
        ]
        assert sum(r.changed for r in results.rows) == 2
        table = results.query_one(DataTable)
        assert table.row_count == 11
        assert "2 decision(s) would change" in str(results.query_one("#whatif-title").render())
        await pilot.press("down", "enter")  # the second row: the deploy key
        await until(pilot, lambda: app.screen is screen)
        flow = screen.query_one(ReplayFlowView).selected
        assert flow is not None and flow.path == "/api/files/keys/deploy_key.pem"


async def test_failed_events_of_a_real_proxy_and_markup_in_paths() -> None:
    app = ReplayApp(incident_run().recordings, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        view = screen.query_one(ReplayFlowView)
        await pilot.press("g", "f")
        assert (view.selected.path, view.selected.status) == ("/boom", 500)
        await pilot.press("f")
        assert (view.selected.path, view.selected.status) == ("/anything", 502)
        assert "failed" in row_text(screen, "/anything")
        await pilot.press("G")
        assert "[/admin]/[bold]y" in row_text(screen, "/x/[/admin]/[bold]y")
        assert "held 0/0" in screen.query_one("#replay-header").lines.plain


async def test_search_filter_and_seek() -> None:
    app = ReplayApp(demo_run().recordings, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        store = screen.store
        await pilot.press("s")
        screen.query_one("#search", Input).value = "GITHUB_token"
        await pilot.press("enter")
        await until(pilot, lambda: store.search_hits is not None)
        assert store.visible_count == 1 and store.visible(0).path == "/api/builds/42/log"
        await pilot.press("s")
        screen.query_one("#search", Input).value = ""
        await pilot.press("enter")
        await until(pilot, lambda: store.search_hits is None)
        assert store.visible_count == 11
        await pilot.press("slash")
        screen.query_one("#filter", Input).value = "decision:denied"
        await pilot.press("enter")
        await until(pilot, lambda: store.visible_count == 5)
        screen.query_one("#filter", Input).value = ""
        await until(pilot, lambda: store.visible_count == 11)
        await pilot.press("escape", "t")
        prompt = await until(
            pilot, lambda: app.screen if isinstance(app.screen, PromptScreen) else 0
        )
        prompt.query_one(Input).value = "half past"
        await pilot.press("enter")
        assert app.screen is prompt and "not a time" in str(
            prompt.query_one("#prompt-error").render()
        )
        prompt.query_one(Input).value = "seq 17"
        await pilot.press("enter")
        await until(pilot, lambda: app.screen is screen)
        assert store.current is not None and store.current.seq == 17


async def test_playing_follows_the_recorded_pace_and_speeds() -> None:
    clock = [0.0]
    app = ReplayApp(demo_run().recordings, utc=True, monotonic=lambda: clock[0])
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        timeline = screen.timeline
        await pilot.press("space")  # at the end: starts over from the first event
        assert screen.playing and screen.store.position == 0
        clock[0] = 0.2
        await pilot.pause(0.15)
        assert screen.store.position == timeline.at_time(timeline.start + 0.2)
        await pilot.press("x")  # 4x from here
        clock[0] = 0.25
        await pilot.pause(0.15)
        assert screen.speed == 4
        assert screen.store.position == timeline.at_time(timeline.start + 0.2 + 0.05 * 4)
        assert "PLAYING 4x" in screen.query_one("#replay-header").lines.plain
        await pilot.press("space")
        assert not screen.playing
        screen.play_at(16)
        clock[0] = 10.0
        await until(pilot, lambda: not screen.playing)
        assert screen.store.position == len(timeline) - 1


async def test_har_export_of_the_session_and_of_one_flow(tmp_path: Path) -> None:
    app = ReplayApp(demo_run().recordings, utc=True, cwd=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        await pilot.press("e")
        prompt = await until(
            pilot, lambda: app.screen if isinstance(app.screen, PromptScreen) else 0
        )
        default = Path(prompt.query_one(Input).value)
        assert default.parent == tmp_path and default.suffix == ".har"
        await pilot.press("enter")
        await until(pilot, lambda: default.exists())
        entries = json.loads(default.read_text())["log"]["entries"]
        assert len(entries) == 11
        await pilot.press("g", "m", "E")
        prompt = await until(
            pilot, lambda: app.screen if isinstance(app.screen, PromptScreen) else 0
        )
        one = tmp_path / "one.har"
        prompt.query_one(Input).value = str(default)  # exists: refused
        await pilot.press("enter")
        assert app.screen is prompt and "exists" in str(prompt.query_one("#prompt-error").render())
        prompt.query_one(Input).value = str(one)
        await pilot.press("enter")
        await until(pilot, lambda: one.exists())
        (entry,) = json.loads(one.read_text())["log"]["entries"]
        assert entry["request"]["url"].startswith("http://127.0.0.1:")
        assert entry["request"]["url"].endswith("/build/api/builds/42/log")
        assert entry["_sluice"]["mask_spans"][0]["rule"] == "github-pat"
        assert screen.store.position >= 0


async def test_help_keys_and_command_palette() -> None:
    app = ReplayApp(demo_run().recordings, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        screen = await opened(pilot)
        ids = {binding.id for binding in ReplayScreen.BINDINGS}
        assert {"replay.play", "replay.next_denied", "replay.what_if", "replay.seek"} <= ids
        assert all(binding.id for binding in ReplayScreen.BINDINGS)
        await pilot.press("question_mark")
        await until(pilot, lambda: type(app.screen).__name__ == "HelpScreen")
        await pilot.press("escape")
        titles = {command.title for command in app.get_system_commands(screen)}
        assert {"Play at 4x", "Next held", "What-if", "Export session to HAR"} <= titles
        assert {"Seek to a time", "Search bodies and headers", "Integrity"} <= titles


async def test_a_file_with_one_session_opens_it_directly() -> None:
    (path,) = sorted(demo_run().recordings.glob("*.jsonl"))
    app = ReplayApp(path, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert not any(isinstance(s, SessionsScreen) for s in app.screen_stack)
        await pilot.press("q")
    assert app.return_code == 0


async def test_the_sessions_key_goes_back_to_the_browser_and_reopens() -> None:
    (path,) = sorted(demo_run().recordings.glob("*.jsonl"))
    app = ReplayApp(path, utc=True)
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await pilot.press("o")
        browser = await browser_ready(pilot)
        await until(pilot, lambda: browser.query_one(SessionList).states)
        await pilot.press("enter")
        await ready(pilot)
        kinds = [type(s).__name__ for s in app.screen_stack[1:]]
        assert kinds == ["SessionsScreen", "ReplayScreen"]
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, SessionsScreen))
        assert len(app.screen_stack) == 2


async def test_a_pinned_public_key_is_used_by_the_integrity_check() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from proxy.recording.keys import load_public_key_file

    recordings = demo_run().recordings
    own = load_public_key_file(recordings / "recording-key.pub")
    other = Ed25519PrivateKey.generate().public_key()
    for key, expected in ((own, "VERIFIED"), (other, "signed by an unknown key")):
        app = ReplayApp(recordings, utc=True, public_key=key)
        async with app.run_test(size=SIZE) as pilot:
            screen = await opened(pilot)
            assert expected in screen.query_one(IntegrityBanner).text.plain
