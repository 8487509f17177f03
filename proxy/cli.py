"""The ``sluice`` command: exit 0 on success, 2 on bad usage or an invalid config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from proxy.config import Config, ConfigError, default_config_path, load_config, parse_host_port
from proxy.state import StateError
from proxy.units import parse_duration

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _host_port(value: str) -> str:
    try:
        parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _duration(value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the lifetime must be positive")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sluice",
        description="An enforcing gateway between AI coding agents and the services they reach.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def config_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            metavar="CONFIG",
            help="config file (default: ./sluice.toml, else the bundled sample)",
        )

    proxy = commands.add_parser(
        "proxy",
        help="run the proxy headless",
        description="Run the proxy headless until SIGTERM or SIGINT, "
        "then drain in-flight requests and exit 0.",
    )
    config_option(proxy)
    proxy.add_argument(
        "--listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="where agents connect (overrides proxy.listen)",
    )
    proxy.add_argument(
        "--admin-listen",
        type=_host_port,
        metavar="HOST:PORT",
        help="where consoles connect (overrides proxy.admin_listen)",
    )
    proxy.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="admin token, keys, recordings (overrides proxy.state_dir)",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a config file",
        description="Validate a config and print each error with its file and line.",
    )
    config_option(check)

    token = commands.add_parser(
        "token",
        help="issue local identity tokens",
        description='Tokens signed by this proxy\'s local issuer ([identity] mode = "local").',
    )
    token_commands = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    issue = token_commands.add_parser(
        "issue", help="print a new token", description="Print a token for an agent or an approver."
    )
    config_option(issue)
    issue.add_argument("--sub", required=True, metavar="NAME", help="the token's subject")
    issue.add_argument("--groups", default="", metavar="A,B", help="comma-separated groups")
    issue.add_argument(
        "--ttl",
        type=_duration,
        metavar="DURATION",
        help='lifetime such as "8h" (default: identity.token_ttl)',
    )

    _tls_parsers(commands, config_option)

    mask = commands.add_parser(
        "mask",
        help="mask secrets in a file or stdin",
        description="Mask secrets the way the proxy masks response bodies. Prints the masked "
        "text, or with --json {masked, spans}. Exit 0 whether or not anything was masked.",
    )
    config_option(mask)
    mask.add_argument("file", nargs="?", metavar="FILE", help="file to mask (default: stdin)")
    mask.add_argument("--json", action="store_true", help="print JSON with the mask spans")

    verify = commands.add_parser(
        "verify",
        help="check recordings for tampering",
        description="Verify recording files (or directories of them): the hash chain, and "
        "the checkpoint signatures. Exit 0 when every file is intact and signed, 1 naming "
        "the file and the first bad seq otherwise.",
    )
    verify.add_argument("paths", nargs="+", metavar="PATH")
    verify.add_argument(
        "--public-key",
        metavar="FILE",
        help="the recording key to trust (default: recording-key.pub beside "
        "the files; pin it to catch a re-signed forgery)",
    )
    sessions = commands.add_parser(
        "sessions",
        help="list recorded sessions",
        description="Recorded sessions with their counts and integrity.",
    )
    config_option(sessions)
    sessions.add_argument("--json", action="store_true", help="print JSON")
    har = commands.add_parser(
        "export-har",
        help="export a recording as HAR 1.2",
        description="Write a recording (or one session or request of it) as HAR 1.2, with "
        "bodies as the agent received them (masked).",
    )
    har.add_argument("path", metavar="PATH")
    har.add_argument("-o", "--output", required=True, metavar="FILE", help='"-" for stdout')
    har.add_argument("--session", metavar="ID")
    har.add_argument("--request-id", metavar="ID")

    demo = commands.add_parser(
        "demo",
        help="run the bundled demo",
        description="Start demo upstreams, a proxy and a scripted agent, "
        "and show each decision as it happens.",
    )
    config_option(demo)
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep running headless for a console to attach (used by the console's demo)",
    )
    demo.add_argument(
        "--pause",
        type=float,
        default=0.6,
        metavar="SECONDS",
        help="pause between the agent's steps (default 0.6)",
    )
    return parser


def _tls_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    ca = commands.add_parser(
        "ca",
        help="the local CA used to intercept agents' TLS",
        description="Sluice's local CA (<state_dir>/ca/), created on first use.",
    )
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    export = ca_commands.add_parser(
        "export",
        help="print the CA certificate (PEM)",
        description="Print the CA certificate for clients to trust, creating the CA if needed.",
    )
    config_option(export)
    export.add_argument("--path", action="store_true", help="print the file's path instead")
    env = commands.add_parser(
        "env",
        help="print shell exports that send an agent's traffic through Sluice",
        description='Print HTTP(S)_PROXY, NO_PROXY and CA variables for eval "$(sluice env)". '
        'With [identity] mode = "local" the proxy URL carries a fresh token for --sub.',
    )
    config_option(env)
    env.add_argument("--sub", default="agent", metavar="NAME", help='token subject ("agent")')
    env.add_argument("--groups", default="", metavar="A,B", help="comma-separated groups")
    env.add_argument(
        "--ttl",
        type=_duration,
        metavar="DURATION",
        help='token lifetime such as "8h" (default: identity.token_ttl)',
    )


def _load(path: Path | None, state_dir: Path | None = None) -> Config:
    return load_config(path or default_config_path(), state_dir=state_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("verify", "export-har"):  # recordings need no config
        from proxy.recording.cli import run_export_har, run_verify

        if args.command == "verify":
            return run_verify(args.paths, public_key=args.public_key)
        return run_export_har(
            args.path, args.output, session=args.session, request_id=args.request_id
        )
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="sluice %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = _load(args.config, getattr(args, "state_dir", None))
    except ConfigError as exc:
        print(f"invalid config:\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _dispatch(config, args)
    except StateError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(config: Config, args: argparse.Namespace) -> int:
    if args.command == "check-config":
        print(
            f"{config.path}: ok ({len(config.targets)} targets, {len(config.policy.rules)} rules)"
        )
        return EXIT_OK
    if args.command == "proxy":
        return _run_proxy(config, args)
    if args.command == "sessions":
        from proxy.recording.cli import run_sessions

        return run_sessions(str(config.state_dir / config.recording.directory), args.json)
    if args.command == "mask":
        return _mask(config, args)
    if args.command == "token":
        return _issue_token(config, args)
    if args.command == "ca":
        from proxy.tls.commands import run_ca_export

        return run_ca_export(config, args.path)
    if args.command == "env":
        from proxy.tls.commands import run_env

        if not args.sub.strip():
            print("sluice env: --sub must not be empty", file=sys.stderr)
            return EXIT_USAGE
        groups = [group.strip() for group in args.groups.split(",") if group.strip()]
        return run_env(config, args.sub.strip(), groups, args.ttl)
    if args.command == "demo":
        from proxy.demo.runner import run_demo

        return asyncio.run(run_demo(config, pause=args.pause, serve=args.serve))
    return EXIT_USAGE


def _mask(config: Config, args: argparse.Namespace) -> int:
    from proxy.masking.builtin import builtin_rules
    from proxy.masking.cli import run_mask
    from proxy.masking.engine import Masker
    from proxy.masking.key import load_or_create_mask_key
    from proxy.masking.rules import select_rules

    key = load_or_create_mask_key(config.state_dir)
    settings = config.masking
    rules = select_rules(
        builtin_rules(),
        disable=settings.disable,
        custom=[rule.model_dump() for rule in settings.rules],
    )
    return run_mask(args.file, args.json, key, masker=Masker(rules, hmac_key=key))


def _issue_token(config: Config, args: argparse.Namespace) -> int:
    from proxy.identity.local import LocalIssuer

    identity = config.identity
    if identity.mode != "local":
        print(
            f'sluice token issue needs [identity] mode = "local" (this config has '
            f'"{identity.mode}")',
            file=sys.stderr,
        )
        return EXIT_USAGE
    if not args.sub.strip():
        print("sluice token issue: --sub must not be empty", file=sys.stderr)
        return EXIT_USAGE
    groups = [group.strip() for group in args.groups.split(",") if group.strip()]
    issuer = LocalIssuer(
        config.state_dir, issuer=identity.effective_issuer, audience=identity.audience
    )
    print(
        issuer.issue(
            args.sub.strip(),
            groups,
            args.ttl or identity.token_ttl,
            groups_claim=identity.groups_claim,
        )
    )
    return EXIT_OK


def _run_proxy(config: Config, args: argparse.Namespace) -> int:
    from proxy.server.runtime import Overrides, ProxyRuntime

    overrides = Overrides(args.listen, args.admin_listen, args.state_dir)

    async def serve() -> int:
        runtime = ProxyRuntime(config, overrides)
        try:
            await runtime.start()
        except OSError as exc:
            print(f"sluice: {exc}", file=sys.stderr)
            await runtime.stop()
            return EXIT_FAILED
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        print(f"sluice proxy listening on {runtime.main_url}", flush=True)
        for listener in runtime.listeners[1:]:
            print(f"  target {listener.name} also on {listener.url}", flush=True)
        for name, target in config.targets.items():
            print(f"  {runtime.main_url}/{name}/ -> {target.upstream}", flush=True)
        print(
            f"admin API on {runtime.admin_url} (token in {runtime.state_dir / 'admin.token'})",
            flush=True,
        )
        await stop.wait()
        print("sluice proxy stopping: draining in-flight requests", flush=True)
        await runtime.stop()
        print("sluice proxy stopped", flush=True)
        return EXIT_OK

    return asyncio.run(serve())


if __name__ == "__main__":
    raise SystemExit(main())
