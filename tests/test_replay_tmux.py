"""End to end in a real terminal: `sluice replay` on the recording of `python -m proxy demo`.

tmux drives the real program (send-keys, capture-pane) as a person would: pick the
session, go to the start, jump to the masked event, jump back to a denial with a shifted
key, search a body, and quit with exit code 0.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from test_replay_support import demo_run

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def _tmux(*args: str) -> str:
    return subprocess.run(
        ["tmux", *args], check=True, capture_output=True, text=True, timeout=10
    ).stdout


def _wait_for(session: str, *texts: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux("capture-pane", "-p", "-t", session)
        if all(text in screen for text in texts):
            return screen
        time.sleep(0.1)
    raise AssertionError(f"{texts!r} did not appear within {timeout}s; screen:\n{screen}")


def test_replay_in_tmux_steps_jumps_and_quits() -> None:
    recordings = demo_run().recordings
    session = f"sluice-replay-{uuid.uuid4().hex[:8]}"
    command = shlex.join([sys.executable, "-m", "console", "replay", str(recordings)])
    _tmux(
        "new-session", "-d", "-s", session, "-x", "150", "-y", "48",
        f"sleep 0.5; {command}; echo EXITED $?; sleep 30",
    )  # fmt: skip
    try:
        screen = _wait_for(session, "SESSION", "demo-agent", "verified")
        assert "INTEGRITY" in screen
        _tmux("send-keys", "-t", session, "Enter")
        _wait_for(session, "SLUICE REPLAY", "event 26/26", "VERIFIED and signed")
        _tmux("send-keys", "-t", session, "g")
        _wait_for(session, "event 1/26", "session.start")
        _tmux("send-keys", "-t", session, "m")
        screen = _wait_for(session, "REGION", "github-pat", "response 200 · masked 1")
        assert "/api/builds/42/log" in screen and "ghp_****" in screen
        _tmux("send-keys", "-t", session, "D")  # shift+d: the previous denial
        screen = _wait_for(session, "decision denied (push-to-main)")
        _tmux("send-keys", "-t", session, "Right")
        _wait_for(session, "response 403")
        _tmux("send-keys", "-t", session, "s")
        _tmux("send-keys", "-t", session, "-l", "fix typo")
        _tmux("send-keys", "-t", session, "Enter")
        _wait_for(session, "search “fix typo”: 2 flow(s)", "flows 1 of 11")  # one is later
        _tmux("send-keys", "-t", session, "q")
        _wait_for(session, "EXITED 0")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=10)
