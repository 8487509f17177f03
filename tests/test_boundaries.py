"""Architecture boundaries: the import-linter contracts hold, and the headless core stays so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Packages outside the headless core: they may use aiohttp (server) or run programs (demo).
EXCLUDED_PACKAGES = ("proxy.server", "proxy.demo")
#: ``python -m proxy``: importing it runs the CLI.
EXCLUDED_MODULES = ("proxy.__main__",)
FORBIDDEN = ("aiohttp", "textual", "console")


def core_modules() -> list[str]:
    names = []
    for path in sorted((REPO_ROOT / "proxy").rglob("*.py")):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        if name in EXCLUDED_MODULES or any(
            name == package or name.startswith(package + ".") for package in EXCLUDED_PACKAGES
        ):
            continue
        names.append(name)
    return names


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"import-linter is not installed at {lint_imports}"
    result = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" in result.stdout and " 0 broken" in result.stdout


def test_core_module_list_is_complete() -> None:
    modules = core_modules()
    for expected in (
        "proxy",
        "proxy.config",
        "proxy.matcher",
        "proxy.policy",
        "proxy.events",
        "proxy.flows",
        "proxy.headers",
        "proxy.state",
        "proxy.reload",
        "proxy.units",
        "proxy.tomlpos",
        "proxy.cli",
    ):
        assert expected in modules
    assert not any(name.startswith(EXCLUDED_PACKAGES) for name in modules)


def test_core_imports_leave_server_and_ui_libraries_unloaded() -> None:
    modules = core_modules()
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}\n"
        f"                or m.startswith({EXCLUDED_PACKAGES!r}))\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
