"""``sluice console`` (attach to a proxy) and ``sluice run`` (start one, then attach).

Every other command is the proxy's: this module hands over with ``os.execv`` and never
imports ``proxy.cli``, so the console stays a client of the proxy, not a part of it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
OUR_COMMANDS = ("console", "run", "demo", "replay")
ADMIN_LINE = re.compile(r"admin API on (?P<url>https?://\S+) \(token in (?P<token>.+)\)\s*$")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice", description="The Sluice console (other commands: see sluice --help)."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    console = commands.add_parser(
        "console",
        help="attach the console to a running proxy",
        description="Attach the terminal console to a running proxy's admin API, "
        "local or remote. The token is read from a file or an environment variable.",
    )
    console.add_argument("--admin", required=True, metavar="URL", help="e.g. http://127.0.0.1:8701")
    source = console.add_mutually_exclusive_group()
    source.add_argument("--token-file", type=Path, metavar="FILE", help="admin token file")
    source.add_argument(
        "--token-env", metavar="NAME", help="environment variable holding the admin token"
    )
    _max_flows(console)
    run = commands.add_parser(
        "run",
        help="start a proxy and attach the console",
        description="Start the proxy in a child process, attach the console to it, and stop "
        "the proxy (draining in-flight requests) when the console quits.",
    )
    run.add_argument("-c", "--config", type=Path, metavar="CONFIG", help="config file")
    _max_flows(run)
    demo = commands.add_parser(
        "demo",
        help="run the bundled demo in the console",
        description="Start the demo upstreams, a proxy and a scripted agent, and open the "
        "console on them: approve or deny what the agent's requests hold. Without a "
        "terminal (or with --plain) the demo prints its decisions as text instead.",
    )
    demo.add_argument("-c", "--config", type=Path, metavar="CONFIG", help="config file")
    demo.add_argument("--plain", action="store_true", help="print decisions as text")
    demo.add_argument(
        "--pause",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="pause between the agent's steps (default 2 in the console)",
    )
    _max_flows(demo)
    _replay_parser(commands)
    return parser


def _replay_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay",
        help="replay recorded sessions offline (no proxy needed)",
        description="Open a recording file or a recordings directory: a sessions browser, "
        "then the flow list and details driven by a playhead (step, jump, play, seek), the "
        "integrity of the recording, search, what-if with another config, and HAR export.",
    )
    replay.add_argument("path", type=Path, metavar="PATH", help="recording file or directory")
    replay.add_argument("--session", metavar="ID", help="open this session directly")
    replay.add_argument(
        "--public-key",
        type=Path,
        metavar="FILE",
        help="verify checkpoints with this key (default: recording-key*.pub beside the files)",
    )
    replay.add_argument("--utc", action="store_true", help="show times in UTC")


def run_replay(args: argparse.Namespace) -> int:
    """The replay app on a recording; no proxy is started or contacted."""
    from console.replay_app import ReplayApp
    from proxy.recording.keys import KeyFileError, load_public_key_file

    if not args.path.exists():
        raise UsageError(f"no such file or directory: {args.path}")
    key = None
    if args.public_key is not None:
        try:
            key = load_public_key_file(args.public_key)
        except KeyFileError as exc:
            raise UsageError(f"--public-key: {exc}") from None
    app = ReplayApp(args.path, session=args.session, utc=args.utc, public_key=key)
    code = app.run()
    return int(code or 0)


def _max_flows(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--max-flows",
        type=int,
        default=100_000,
        metavar="N",
        help="flows kept in the console (the oldest are dropped; default 100000)",
    )


def read_token(args: argparse.Namespace) -> str:
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token.strip():
            raise UsageError(f"environment variable {args.token_env} is not set or empty")
        return token.strip()
    path = args.token_file
    if path is None:
        token = os.environ.get("SLUICE_ADMIN_TOKEN", "")
        if token.strip():
            return token.strip()
        raise UsageError("give --token-file FILE or --token-env NAME (or set SLUICE_ADMIN_TOKEN)")
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror}") from None


def run_console(url: str, token: str, max_flows: int) -> int:
    from console.app import SluiceConsole
    from console.client import AdminClient

    app = SluiceConsole(AdminClient(url, token), max_flows=max_flows)
    app.run()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in OUR_COMMANDS:
        if argv[:1] in (["-h"], ["--help"]):
            print("sluice console --help / sluice run --help: the terminal console.", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "proxy", *argv])
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.command == "replay":
        try:
            return run_replay(args)
        except UsageError as exc:
            print(f"sluice replay: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.max_flows < 1:
        print("sluice: --max-flows must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "console":
            return run_console(args.admin, read_token(args), args.max_flows)
        if args.command == "demo":
            return _demo(args, argv)
        return run_with_proxy(args.config, args.max_flows)
    except UsageError as exc:
        print(f"sluice {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _demo(args: argparse.Namespace, argv: list[str]) -> int:
    """The console on the demo in a terminal; the proxy's plain-text demo otherwise."""
    if args.plain or not (sys.stdin.isatty() and sys.stdout.isatty()):
        rest = [arg for arg in argv if arg != "--plain"]
        os.execv(sys.executable, [sys.executable, "-m", "proxy", *_proxy_demo_args(rest)])
    extra = ["demo", "--serve", "--pause", str(args.pause)]
    if args.config is not None:
        extra += ["-c", str(args.config)]
    return run_with_proxy(None, args.max_flows, command=extra)


def _proxy_demo_args(argv: list[str]) -> list[str]:
    """The proxy's demo takes -c and --pause; the console's --max-flows is dropped."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--max-flows":
            skip = True
            continue
        if not arg.startswith("--max-flows="):
            out.append(arg)
    return out


# -- sluice run ----------------------------------------------------------------------------


def _stop_with_parent() -> None:
    """In the child: get SIGTERM (a graceful drain) if the console dies without cleaning
    up, e.g. its terminal was closed; never outlive it as an orphan proxy."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


class ProxyChild:
    """A proxy in its own process; its output goes to a log file, never over the UI."""

    def __init__(
        self,
        config: Path | None,
        log_path: Path | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.command = [sys.executable, "-m", "proxy", *(command or ["proxy"])]
        if config is not None:
            self.command += ["-c", str(config)]
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="sluice-proxy-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.process: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self._pump: threading.Thread | None = None

    def start(self, timeout: float = START_TIMEOUT) -> tuple[str, Path]:
        """Start and wait for the admin line; returns (admin URL, token file)."""
        self._log = self.log_path.open("a", encoding="utf-8")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # the terminal's Ctrl+C is the console's, not the proxy's
            preexec_fn=_stop_with_parent,
        )
        found: list[tuple[str, Path]] = []
        ready = threading.Event()
        self._pump = threading.Thread(
            target=self._read, args=(found, ready), name="sluice-proxy-output", daemon=True
        )
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
        if not found:
            self.stop()
            raise RuntimeError(f"the proxy did not start (see {self.log_path})")
        return found[0]

    def _read(self, found: list[tuple[str, Path]], ready: threading.Event) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            if self._log is not None:
                self._log.write(line)
                self._log.flush()
            match = ADMIN_LINE.search(line)
            if match and not found:
                found.append((match["url"], Path(match["token"])))
                ready.set()
        ready.set()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then wait while the proxy drains in-flight requests."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._pump is not None:
            self._pump.join(2)
        if self._log is not None:
            self._log.close()
            self._log = None
        return process.returncode


def run_with_proxy(
    config: Path | None,
    max_flows: int,
    attach: Callable[[str, str, int], int] = run_console,
    command: list[str] | None = None,
) -> int:
    child = ProxyChild(config, command=command)
    try:
        url, token_file = child.start()
    except RuntimeError as exc:
        print(f"sluice run: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):
            sys.stderr.write(child.log_path.read_text(encoding="utf-8")[-4000:])
        return EXIT_FAILED
    try:
        return attach(url, token_file.read_text(encoding="utf-8").strip(), max_flows)
    finally:
        code = child.stop()
        print(f"sluice run: proxy stopped (exit {code}); its log is {child.log_path}")


if __name__ == "__main__":
    raise SystemExit(main())
