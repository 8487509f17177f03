"""The console against a real proxy process: flows, filter, approvals, reconnect.

The proxy runs as ``python -m proxy proxy`` in its own process (as ``sluice run`` starts
it) on free 127.0.0.1 ports, in front of a real aiohttp upstream served by the test.
The console is driven headless with Pilot.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import client_session, config_text, upstream_app
from rich.console import Console, Group
from textual.pilot import Pilot
from textual.widgets import Input
from yarl import URL

import proxy
from console.app import SluiceConsole
from console.approvals_ui import ApprovalPrompt
from console.client import AdminClient, ConnState
from console.detail import describe_flow
from console.header import Banner
from console.render import plain
from proxy.masking.fakes import fake

pytestmark = pytest.mark.asyncio
LEAKED = fake("github-pat", random.Random(77))[0]  # served by the upstream: masked
SENT = fake("github-pat", random.Random(78))[0]  # sent by the agent: hidden on screen
SOURCE_ROOT = Path(proxy.__file__).resolve().parent.parent
ADMIN_LINE = re.compile(r"admin API on (\S+) \(token in (.+)\)")
APPROVE_RULES = [
    {
        "name": "deploys",
        "action": "approve",
        "path": "/deploy/**",
        "reason": "deploys need a person",
    },
    {"name": "the-rest", "action": "allow"},
]


@dataclass
class ProxyProcess:
    config: Path
    state_dir: Path
    process: asyncio.subprocess.Process | None = None
    admin_url: str = ""
    token: str = ""
    main_url: str = ""

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
        env["PYTHONUNBUFFERED"] = "1"
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "proxy",
            "-c",
            str(self.config),
            "--state-dir",
            str(self.state_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        assert self.process.stdout is not None
        while True:
            line = (await asyncio.wait_for(self.process.stdout.readline(), 20)).decode()
            assert line, "the proxy exited before printing its admin URL"
            if line.startswith("sluice proxy listening on "):
                self.main_url = line.split()[-1]
            if match := ADMIN_LINE.search(line):
                self.admin_url = match[1]
                self.token = Path(match[2]).read_text().strip()
                return

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                await asyncio.wait_for(self.process.communicate(), 20)
        self.process = None


class Upstream:
    """Answers JSON naming what it received; ``/boom`` answers 500."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.path)
        await request.read()
        if request.path.endswith("/leak"):
            return web.json_response({"name": "deploy", "token": LEAKED})
        status = 500 if request.path.endswith("/boom") else 200
        return web.json_response({"upstream": "ok", "path": request.path}, status=status)


@contextlib.asynccontextmanager
async def stack(
    tmp_path: Path, rules: list[dict[str, Any]] | None = None
) -> AsyncIterator[tuple[ProxyProcess, Upstream]]:
    upstream = Upstream()
    async with upstream_app(upstream.app()) as url:
        text = config_text(
            tmp_path, upstreams={"api": url}, rules=rules or [{"name": "all", "action": "allow"}]
        )
        text += '\n[approvals]\ntimeout = "30s"\n'
        config = tmp_path / "sluice.toml"
        config.write_text(text, encoding="utf-8")
        running = ProxyProcess(config, tmp_path / "state")
        await running.start()
        try:
            yield running, upstream
        finally:
            await running.stop()


async def until(pilot: Pilot[Any], check: Callable[[], Any], seconds: float = 10.0) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"condition not met within {seconds}s")


def console(running: ProxyProcess) -> SluiceConsole:
    return SluiceConsole(AdminClient(running.admin_url, running.token))


def row_texts(app: SluiceConsole) -> list[str]:
    view = app.view
    height = view.scrollable_content_region.height
    return ["".join(seg.text for seg in view.render_line(y)) for y in range(height)]


async def agent(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with client_session() as session, session.request(method, url, **kwargs) as reply:
        return reply.status, json.loads(await reply.read())


async def test_flows_appear_render_literally_and_filter(tmp_path: Path) -> None:
    async with stack(tmp_path) as (running, _upstream):
        app = console(running)
        async with app.run_test(size=(140, 40)) as pilot:
            await until(pilot, lambda: app._stream and app._stream.state is ConnState.CONNECTED)
            assert (await agent("GET", f"{running.main_url}/api/items/1"))[0] == 200
            nasty = URL(f"{running.main_url}/api/[/admin]/[bold]x", encoded=True)
            assert (await agent("GET", nasty))[0] == 200
            assert (await agent("POST", f"{running.main_url}/api/boom"))[0] == 500
            await until(pilot, lambda: app.store.visible_count == 3 and app.store.visible(2).status)
            rows = "\n".join(row_texts(app))
            assert "/[/admin]/[bold]x" in rows, rows
            assert "/items/1" in rows and "500" in rows

            await pilot.press("slash", *"status:5xx", "enter")
            await until(pilot, lambda: app.store.visible_count == 1)
            assert app.store.visible(0).path == "/boom"

            await pilot.press("slash")
            app.query_one("#filter", Input).value = "stat:5"  # one edit: no valid state between
            await pilot.press("enter")
            error = app.query_one("#filter-error")
            await until(pilot, lambda: error.has_class("-shown"))
            shown = str(error.render())
            assert "unknown field 'stat'" in shown and "^" in shown
            assert app.query_one("#filter").has_class("-invalid")
            assert app.store.visible_count == 1  # the last good filter stays in force

            app.query_one("#filter", Input).value = ""
            await pilot.press("enter")  # the filter bar kept the focus after the error
            await until(pilot, lambda: app.store.visible_count == 3)
            assert not error.has_class("-shown")


async def _held_prompt(
    pilot: Pilot[Any], app: SluiceConsole, running: ProxyProcess, path: str
) -> tuple[asyncio.Task[tuple[int, dict[str, Any]]], ApprovalPrompt]:
    await until(pilot, lambda: app._stream and app._stream.state is ConnState.CONNECTED)
    call = asyncio.create_task(agent("POST", f"{running.main_url}/api{path}", json={"env": "prod"}))
    prompt = await until(pilot, lambda: isinstance(app.screen, ApprovalPrompt) and app.screen)
    return call, prompt


async def test_approve_once_after_guard(tmp_path: Path) -> None:
    async with stack(tmp_path, APPROVE_RULES) as (running, _upstream):
        app = console(running)
        async with app.run_test(size=(140, 45)) as pilot:
            call, prompt = await _held_prompt(pilot, app, running, "/deploy/web")
            assert prompt.guarded
            await pilot.press("a", "d", "enter")  # within 0.5 s: all ignored
            assert app.screen is prompt and not prompt.busy and app.approvals.pending
            assert app.focused is not None and app.focused.id == "deny"
            await asyncio.sleep(max(0.0, 0.55 - (time.monotonic() - prompt.opened_at)))
            await pilot.press("a")
            status, body = await asyncio.wait_for(call, 10)
            assert status == 200 and body == {"upstream": "ok", "path": "/deploy/web"}
            flow = await until(pilot, lambda: app.store.visible_count and app.store.visible(0))
            await until(pilot, lambda: flow.decision == "approved")
            assert "approved by local-operator" in "\n".join(row_texts(app))


async def test_deny_with_typed_reason_and_decided_elsewhere(tmp_path: Path) -> None:
    async with stack(tmp_path, APPROVE_RULES) as (running, upstream):
        app = console(running)
        async with app.run_test(size=(140, 45)) as pilot:
            call, prompt = await _held_prompt(pilot, app, running, "/deploy/db")
            await asyncio.sleep(0.55)
            await pilot.press("r", *"not [b]today[/b]", "enter")
            status, body = await asyncio.wait_for(call, 10)
            assert status == 403
            assert body["code"] == "approval_denied" and "not [b]today[/b]" in body["reason"]
            assert upstream.seen == []

            # Decided by another console: the prompt closes and says who.
            call, prompt = await _held_prompt(pilot, app, running, "/deploy/api")
            other = AdminClient(running.admin_url, running.token)
            try:
                result = await other.decide(prompt.approval_id, "approve", "once", "lgtm")
                assert result.ok
                await until(pilot, lambda: not isinstance(app.screen, ApprovalPrompt))
                assert (await asyncio.wait_for(call, 10))[0] == 200
                late = await other.decide(prompt.approval_id, "deny", "once")
                assert late.status == 409 and late.conflict_by == "local-operator"
            finally:
                await other.close()

            def told() -> bool:
                messages = [plain(n.message) for n in app._notifications]
                return any("approved by local-operator" in m for m in messages)

            await until(pilot, told)


async def test_reconnects_after_proxy_restart(tmp_path: Path) -> None:
    async with stack(tmp_path) as (running, _upstream):
        app = console(running)
        app.client_backoff = (0.1, 0.3)
        async with app.run_test(size=(120, 30)) as pilot:
            banner = app.query_one(Banner)
            await until(pilot, lambda: app._stream and app._stream.state is ConnState.CONNECTED)
            assert (await agent("GET", f"{running.main_url}/api/before"))[0] == 200
            await until(pilot, lambda: app.store.visible_count == 1)
            assert not banner.lost
            await running.stop()
            await until(pilot, lambda: banner.lost)
            assert "lost" in str(banner.render())
            await running.start()
            await until(pilot, lambda: not banner.lost, 15)
            assert (await agent("GET", f"{running.main_url}/api/after"))[0] == 200
            await until(pilot, lambda: any(f.path == "/after" for f in app.store))
            assert app.store.get(app.store.visible(0).request_id) is not None


async def test_detail_pane_shows_recorded_headers_and_bodies(tmp_path: Path) -> None:
    async with stack(tmp_path) as (running, _upstream):
        app = console(running)
        async with app.run_test(size=(140, 60)) as pilot:
            await until(pilot, lambda: app._stream and app._stream.state is ConnState.CONNECTED)
            status, body = await agent(
                "POST",
                f"{running.main_url}/api/leak",
                json={"note": "[bold]hi[/bold]", "key": SENT},
                headers={"X-Trace": "[red]t-1"},
            )
            assert status == 200 and body["token"] != LEAKED  # the agent got it masked
            await until(pilot, lambda: app.store.visible_count == 1 and app.store.visible(0).status)
            await pilot.press("enter")  # select the flow: the pane asks the admin API
            await until(pilot, lambda: app._detail is not None)
            detail = app._detail[1]
            assert detail.unavailable is None, detail.unavailable
            assert ("X-Trace", "[red]t-1") in detail.request_headers  # literal, never markup
            assert any(k.lower() == "content-type" for k, _ in detail.response_headers)
            assert detail.response_body is not None and detail.response_body.spans
            assert LEAKED.encode() not in detail.response_body.data
            assert detail.request_body is not None and detail.request_body.spans
            assert SENT.encode() not in detail.request_body.data  # hidden before it left
            assert b"[bold]hi[/bold]" in detail.request_body.data
            screen = Console(width=140, record=True, file=io.StringIO())
            screen.print(Group(*describe_flow(app.store.visible(0), detail=detail)))
            text = screen.export_text()
            for word in ("REQ HEAD", "X-Trace: [red]t-1", "RESP BODY", "masked (github-pat)"):
                assert word in text, (word, text)
            assert LEAKED not in text and SENT not in text
