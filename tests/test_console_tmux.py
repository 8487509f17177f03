"""End to end in a real terminal: `sluice demo` in tmux, approve a held push with a key.

tmux drives the real program (send-keys, capture-pane) as a person would. The demo agent
runs against a copy of the sample config on free loopback ports.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.test_proxy_cli import demo_config

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
SLUICE = [sys.executable, "-m", "console"]


def _tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def _wait_for(session: str, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session)
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} did not appear within {timeout}s; screen:\n{screen}")


def test_demo_in_tmux_approve_a_held_push_with_a_key(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    session = f"sluice-{uuid.uuid4().hex[:8]}"
    command = " ".join([*SLUICE, "demo", "-c", str(config), "--pause", "0.3"])
    _tmux(
        "new-session",
        "-d",
        "-s",
        session,
        "-x",
        "160",
        "-y",
        "48",
        f"cd {tmp_path} && {command}; echo EXITED $?; sleep 30",
    )
    try:
        _wait_for(session, "Approval needed", 40)
        time.sleep(0.7)  # the prompt ignores keys for its first half second
        _tmux("send-keys", "-t", session, "a")
        screen = _wait_for(session, "approved by local-operator", 20)
        assert "/api/push" in screen
        _tmux("send-keys", "-t", session, "q")
        screen = _wait_for(session, "EXITED 0", 40)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
