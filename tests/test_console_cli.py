"""``console.cli``: usage, hand-over to the proxy CLI, and ``run`` with a real child proxy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from helpers import config_text

import proxy
from console import cli

SOURCE_ROOT = Path(proxy.__file__).resolve().parent.parent


@pytest.mark.parametrize("command", ["console", "run"])
def test_help_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([command, "--help"]) == 0
    assert f"usage: sluice {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["console"],
        ["console", "--admin", "http://127.0.0.1:1", "--token-file", "a", "--token-env", "B"],
        ["console", "--admin", "http://127.0.0.1:1", "--token-env", "SLUICE_TEST_NO_SUCH_VAR"],
        ["console", "--admin", "http://127.0.0.1:1", "--token-file", "/nonexistent/token"],
        ["run", "--max-flows", "0"],
        ["run", "--bogus"],
    ],
    ids=["no-admin", "two-token-sources", "empty-env", "missing-file", "max-flows", "flag"],
)
def test_bad_usage_exits_2(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLUICE_ADMIN_TOKEN", raising=False)
    assert cli.main(argv) == 2


def test_other_commands_go_to_the_proxy_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, list[str]]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        calls.append((path, argv))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        cli.main(["check-config", "-c", "x.toml"])
    assert calls == [
        (sys.executable, [sys.executable, "-m", "proxy", "check-config", "-c", "x.toml"])
    ]


def test_console_cli_does_not_import_the_proxy_cli() -> None:
    code = "import sys, console.cli, console.app; print('proxy.cli' in sys.modules, 'proxy.server' in sys.modules)"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_run_starts_attaches_and_stops_the_proxy(tmp_path: Path) -> None:
    config = tmp_path / "sluice.toml"
    config.write_text(config_text(tmp_path, upstreams={"api": "http://127.0.0.1:9"}))
    seen: dict[str, object] = {}

    def attach(url: str, token: str, max_flows: int) -> int:
        request = urllib.request.Request(
            f"{url}/api/health", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as reply:
            seen["health"] = json.loads(reply.read())
        seen["max_flows"] = max_flows
        return 0

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), old]))
    try:
        child = cli.ProxyChild(config, tmp_path / "proxy.log")
        url, token_file = child.start()
        assert url.startswith("http://127.0.0.1:") and token_file.exists()
        assert child.stop() == 0  # SIGTERM, drained, exit 0
        assert "sluice proxy stopped" in (tmp_path / "proxy.log").read_text()
        assert cli.run_with_proxy(config, 123, attach=attach) == 0
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    assert seen["max_flows"] == 123
    assert seen["health"]["status"] == "ok"  # type: ignore[index]


def test_run_reports_a_proxy_that_cannot_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[proxy]\ncolour = 'blue'\n")
    assert cli.run_with_proxy(config, 10, attach=lambda *_: 0) == 1
    assert "did not start" in capsys.readouterr().err
