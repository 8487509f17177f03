"""The ``sluice`` command line, run as a user runs it: ``python -m proxy ...``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import tomli_w
from aiohttp import web
from helpers import LOOPBACK, client_session, free_port, upstream_app, write_config

import proxy

#: The source tree of the ``proxy`` package these tests import, so the child runs the same code.
SOURCE_ROOT = Path(proxy.__file__).resolve().parent.parent
SAMPLE_CONFIG = SOURCE_ROOT / "sample_config.toml"


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sluice(*args: str, cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# --------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "command", [[], ["proxy"], ["check-config"], ["demo"]], ids=["sluice", "proxy", "check", "demo"]
)
def test_help_exits_0(tmp_path: Path, command: list[str]) -> None:
    result = sluice(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "usage: sluice" in result.stdout
    if command:
        assert "--config" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["frobnicate"],
        [],
        ["proxy", "--listen", "not-an-address"],
        ["proxy", "--listen", "127.0.0.1:99999"],
        ["proxy", "--admin-listen", "127.0.0.1"],
        ["demo", "--pause", "soon"],
        ["check-config", "--no-such-flag"],
    ],
    ids=["unknown-command", "no-command", "bad-listen", "port-range", "bad-admin", "pause", "flag"],
)
def test_bad_usage_exits_2(tmp_path: Path, args: list[str]) -> None:
    result = sluice(*args, cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "usage: sluice" in result.stderr


# --------------------------------------------------------------------------- check-config

TARGET = '[[targets]]\nname = "repo"\nupstream = "http://127.0.0.1:9000"\n\n'

BROKEN_CONFIGS = {
    "unknown-key": (
        '[proxy]\nlisten = "127.0.0.1:8700"\ncolour = "blue"\n',
        3,
        "unknown key",
    ),
    "unknown-key-in-limits": (
        TARGET + "[limits]\nmax_headers = 10\nmax_header_lines = 5\n",
        7,
        "unknown key",
    ),
    "bad-glob": (
        TARGET + '[[rules]]\nname = "r1"\naction = "allow"\npath = "/src/[abc"\n',
        8,
        "unclosed '['",
    ),
    "bad-regex": (
        TARGET
        + '[[rules]]\nname = "ok"\naction = "allow"\nmethod = "GET"\n\n'
        + '[[rules]]\nname = "push"\naction = "deny"\n# a comment\nbody = "(unclosed"\n',
        14,
        "invalid regular expression",
    ),
    "duplicate-rule": (
        TARGET
        + '[[rules]]\nname = "same"\naction = "allow"\n\n'
        + '[[rules]]\naction = "deny"\nname = "same"\n',
        11,
        "duplicate name 'same'",
    ),
    "invalid-toml": (
        TARGET + "[[rules]\nname = 'x'\n",
        5,
        "invalid TOML",
    ),
    "bad-duration": (
        "[limits]\n\nheader_timeout = 10\n",
        3,
        "duration",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_CONFIGS))
def test_check_config_reports_file_and_line(tmp_path: Path, case: str) -> None:
    text, line, message = BROKEN_CONFIGS[case]
    config = tmp_path / "broken.toml"
    config.write_text(text)
    result = sluice("check-config", "-c", str(config), cwd=tmp_path)
    assert result.returncode == 2, (result.stdout, result.stderr)
    output = result.stdout + result.stderr
    located = [row for row in output.splitlines() if row.startswith(f"{config}:{line}:")]
    assert located, f"expected {config}:{line}: in\n{output}"
    assert message in located[0], output


def test_check_config_accepts_the_sample(tmp_path: Path) -> None:
    result = sluice("check-config", "-c", str(SAMPLE_CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.search(r": ok \(\d+ targets, \d+ rules\)", result.stdout), result.stdout


def test_check_config_on_a_missing_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = sluice("check-config", "-c", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{missing}: cannot read config" in result.stderr


# --------------------------------------------------------------------------- proxy


@contextlib.asynccontextmanager
async def sluice_process(*args: str, cwd: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=cwd,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def read_until(stream: asyncio.StreamReader, pattern: str, seconds: float = 15) -> list[str]:
    lines = []
    async with asyncio.timeout(seconds):
        while True:
            raw = await stream.readline()
            if not raw:
                raise EOFError(f"output ended before {pattern!r}: {lines}")
            lines.append(raw.decode().rstrip("\n"))
            if re.search(pattern, lines[-1]):
                return lines


@pytest.mark.asyncio
async def test_proxy_serves_and_drains_in_flight_requests_on_sigterm(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(1)
        return web.Response(text="slow but complete")

    async def fast(_request: web.Request) -> web.Response:
        return web.Response(text="fast")

    app = web.Application()
    app.router.add_get("/slow", slow)
    app.router.add_get("/fast", fast)
    async with upstream_app(app) as url:
        config = write_config(tmp_path, upstreams={"repo": url}, proxy={"drain_timeout": "5s"})
        state = tmp_path / "cli-state"
        args = ["proxy", "-c", str(config), "--listen", f"{LOOPBACK}:0"]
        args += ["--admin-listen", f"{LOOPBACK}:0", "--state-dir", str(state)]
        async with sluice_process(*args, cwd=tmp_path) as process:
            assert process.stdout is not None and process.stderr is not None
            banner = await read_until(process.stdout, r"^admin API on ")
            listening = re.search(r"listening on (http://127\.0\.0\.1:\d+)", banner[0])
            assert listening, banner
            main_url = listening.group(1)
            assert any(f"{main_url}/repo/ -> {url}" in line for line in banner), banner
            assert re.search(r"admin API on http://127\.0\.0\.1:\d+ \(token in ", banner[-1])
            assert str(state / "admin.token") in banner[-1]
            assert (state / "admin.token").exists()

            async with client_session() as client:
                async with client.get(f"{main_url}/repo/fast") as reply:
                    assert reply.status == 200
                    assert await reply.text() == "fast"

                async def slow_request() -> tuple[int, str]:
                    async with client.get(f"{main_url}/repo/slow") as reply:
                        return reply.status, await reply.text()

                in_flight = asyncio.create_task(slow_request())
                await asyncio.wait_for(entered.wait(), 5)
                loop = asyncio.get_running_loop()
                stopped_at = loop.time()
                process.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(in_flight, 8) == (200, "slow but complete")
                code = await asyncio.wait_for(process.wait(), 8)
                took = loop.time() - stopped_at
            rest = (await process.stdout.read()).decode()
            stderr = (await process.stderr.read()).decode()
    assert code == 0, stderr
    assert took < 5 + 1.5, f"exit took {took:.1f}s, drain_timeout is 5s"
    assert "draining in-flight requests" in rest
    assert "sluice proxy stopped" in rest


@pytest.mark.asyncio
async def test_proxy_exits_within_drain_timeout_when_a_request_hangs(tmp_path: Path) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hang(_request: web.Request) -> web.Response:
        entered.set()
        await asyncio.wait_for(release.wait(), 20)
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hang)
    async with upstream_app(app) as url:
        config = write_config(tmp_path, upstreams={"repo": url}, proxy={"drain_timeout": "1s"})
        args = ["proxy", "-c", str(config), "--listen", f"{LOOPBACK}:0"]
        args += ["--admin-listen", f"{LOOPBACK}:0"]
        async with sluice_process(*args, cwd=tmp_path) as process, client_session() as client:
            assert process.stdout is not None
            banner = await read_until(process.stdout, r"^admin API on ")
            main_url = banner[0].rsplit(" ", 1)[1]

            async def hung_request() -> None:
                async with client.get(f"{main_url}/repo/hang") as reply:
                    await reply.read()

            in_flight = asyncio.create_task(hung_request())
            try:
                await asyncio.wait_for(entered.wait(), 5)
                loop = asyncio.get_running_loop()
                stopped_at = loop.time()
                process.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(process.wait(), 10)
                took = loop.time() - stopped_at
            finally:
                release.set()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(in_flight, 5)
    assert code == 0
    assert took < 1.0 + 0.6, f"exit took {took:.2f}s with drain_timeout = 1s"


@pytest.mark.asyncio
async def test_proxy_on_a_busy_port_exits_1(tmp_path: Path) -> None:
    with contextlib.closing(__import__("socket").socket()) as busy:
        busy.bind((LOOPBACK, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        config = write_config(tmp_path, upstreams={"repo": f"http://{LOOPBACK}:9"})
        async with sluice_process(
            "proxy", "-c", str(config), "--listen", f"{LOOPBACK}:{port}", cwd=tmp_path
        ) as process:
            code = await asyncio.wait_for(process.wait(), 15)
            assert process.stderr is not None
            stderr = (await process.stderr.read()).decode()
    assert code == 1
    assert f"cannot listen on {LOOPBACK}:{port}" in stderr


# --------------------------------------------------------------------------- demo


def demo_config(tmp_path: Path) -> Path:
    """The bundled sample, moved onto free ports with its state in ``tmp_path``."""
    data = tomllib.loads(SAMPLE_CONFIG.read_text())
    data["proxy"]["listen"] = f"{LOOPBACK}:{free_port()}"
    data["proxy"]["admin_listen"] = f"{LOOPBACK}:{free_port()}"
    data["proxy"]["state_dir"] = str(tmp_path / "demo-state")
    for target in data["targets"]:
        target["upstream"] = f"http://{LOOPBACK}:{free_port()}"
        target.pop("listen", None)
    path = tmp_path / "demo.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_demo_runs_and_shows_its_decisions(tmp_path: Path) -> None:
    config = demo_config(tmp_path)
    result = sluice("demo", "-c", str(config), "--pause", "0", cwd=tmp_path, timeout=45)
    assert result.returncode == 0, (result.stdout, result.stderr)
    out = result.stdout
    assert re.search(r"DENY\s+403\s+GET\s+/repo/api/files/\.env\b", out), out
    assert re.search(r"ALLOW\s+200\s+GET\s+/repo/api/tree\b", out), out
    assert re.search(r"DENY\s+403\s+POST\s+/repo/api/push\b", out), out
    assert "\n11 requests:" in out
    env_text = (tmp_path / "demo-state" / "demo-workspace" / ".env").read_text()
    secrets = [line.split("=", 1)[1] for line in env_text.splitlines() if "=" in line]
    assert secrets
    for secret in secrets:
        assert secret not in out and secret not in result.stderr
