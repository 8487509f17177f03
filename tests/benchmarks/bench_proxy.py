#!/usr/bin/env python3
"""Throughput benchmark: Sluice against a bare aiohttp pass-through proxy and the upstream.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_proxy.py [--quick] [--json FILE]

In one run, with each server in its own process on 127.0.0.1, it measures

* (a) ``direct``: the load generator talks to the aiohttp upstream itself;
* (b) ``minimal``: a bare aiohttp pass-through proxy (``servers.py``; the floor);
* (c) ``sluice``: ``python -m proxy proxy`` with a generated 20-rule policy whose
  matching allow rule comes last;
* (d) ``sluice+id``: the same, plus identity (``mode = "local"``: the load generator sends
  a token the benchmark issued from the proxy's own signing key) and a ``jwt`` credential
  that Sluice mints for the upstream in place of the agent's token;

requests/s and p50/p99 latency at concurrency 1 and 32 for a ``GET`` of a 1 KiB body,
then streams a 1 GiB body through the first three and reports MB/s and the serving
process's RSS (baseline before the transfer and peak during it, sampled every 50 ms).

The load generator is wrk (installed with apt-get when missing and we are root); if that
is impossible, a small asyncio HTTP/1.1 client in a separate process stands in, and the
report says so. The exit status is 0 unless something crashed: missing a target is a
result, not a failure. Helpers live beside this file (harness, loadgen, servers, report).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the helpers are imported by name, also in child roles
    sys.path.insert(0, str(HERE))

from checks import sanity_checks  # noqa: E402
from harness import (  # noqa: E402
    CHUNK,
    ENTRY,
    GIB,
    MIB,
    STREAM_PATH,
    TARGET,
    THROUGHPUT_PATH,
    Child,
    Children,
)
from loadgen import (  # noqa: E402
    LoadResult,
    StreamResult,
    ensure_wrk,
    measure,
    measure_stream,
    role_loadgen,
    run_load,
    wrk_version,
)
from report import machine_info, report, shown  # noqa: E402
from servers import (  # noqa: E402
    ID_AUDIENCE,
    ID_ISSUER,
    ID_SUBJECT,
    role_minimal,
    role_upstream,
    sluice_config,
)

CASES = ("direct", "minimal", "sluice", "sluice+id")
STREAM_CASES = ("direct", "minimal", "sluice")
TOKEN_TTL = 3600.0  # the agent token must outlive the run


def profile_sluice(
    wrk: str | None, workdir: Path, url: str, pid: int, duration: float, output: Path
) -> str:
    """An extra, unreported c=32 run with py-spy attached (sampling perturbs the numbers)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        return "py-spy not found (pip install py-spy into the venv): no profile"
    fmt = {".txt": "raw", ".json": "speedscope"}.get(output.suffix, "flamegraph")
    argv = [py_spy, "record", "--pid", str(pid), "--rate", "200"]
    argv += ["--duration", str(max(1, round(duration))), "--format", fmt, "--output", str(output)]
    spy = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.5)
        run_load(wrk, workdir, url, 32, duration)
        spy.wait(timeout=duration + 30)
    finally:
        if spy.poll() is None:
            spy.terminate()
            spy.wait(5)
    return f"py-spy profile of sluice at c=32 written to {output}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~3 s per case instead of ~9 s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--duration", type=float, help="seconds per measured case")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each case")
    parser.add_argument(
        "--stream-mib",
        type=int,
        default=1024,
        help="size of the streamed body in MiB (default 1024)",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk, installing it if missing, else the Python fallback",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="after measuring, record sluice at c=32 with py-spy into FILE "
        "(.svg flamegraph, .json speedscope, .txt collapsed stacks)",
    )
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_role(args: argparse.Namespace) -> None:
    if args.role == "upstream":
        role_upstream()
    elif args.role == "minimal":
        role_minimal(args.role_args[0])
    elif args.role == "loadgen":
        url, connections, duration, *headers = args.role_args
        role_loadgen(url, int(connections), float(duration), headers)
    else:
        raise SystemExit(f"unknown role {args.role!r}")


def start_sluice(children: Children, name: str, config: Path, state_dir: Path) -> Child:
    argv = [sys.executable, "-m", "proxy", "proxy", "-c", str(config)]
    argv += ["--state-dir", str(state_dir)]
    child = children.start(name, argv, re.compile(r"sluice proxy listening on (http://\S+)"), 30)
    # Let the banner finish (admin URL line) before the checks read it.
    deadline = time.monotonic() + 10
    while "admin API on" not in child.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return child


def issue_agent_token(state_dir: Path) -> str:
    """One agent token from the signing key the ``sluice+id`` proxy will load (it is created
    here, in the proxy's state dir, before the proxy starts)."""
    from proxy.identity.local import LocalIssuer

    issuer = LocalIssuer(state_dir, issuer=ID_ISSUER, audience=ID_AUDIENCE)
    return issuer.issue(ID_SUBJECT, ["agents"], TOKEN_TTL)


def rules_checked(config: Path) -> tuple[int, int]:
    """(rules the benchmark request is tested against, rules in the policy): the policy
    skips rules whose exact target or method limits exclude the request."""
    from proxy.config import load_config

    policy = load_config(config).policy
    return len(policy.candidates(TARGET, "GET")), len(policy.rules)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role:
        run_role(args)
        return 0

    duration = args.duration or (3.0 if args.quick else 9.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    stream_size = args.stream_mib * MIB

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    children = Children(workdir)
    started = time.monotonic()
    try:
        wrk = ensure_wrk(args.loadgen)
        loadgen = wrk_version(wrk)
        machine = machine_info()
        ready = re.compile(r"READY (\d+)")
        role = [sys.executable, str(ENTRY), "--role"]
        upstream = children.start("upstream", [*role, "upstream"], ready, 20)
        upstream.url = f"http://127.0.0.1:{upstream.url}"
        minimal = children.start("minimal", [*role, "minimal", upstream.url], ready, 20)
        minimal.url = f"http://127.0.0.1:{minimal.url}"

        state_dir, id_state_dir = workdir / "state", workdir / "state-id"
        config, id_config = workdir / "sluice-bench.toml", workdir / "sluice-id.toml"
        jwt_key = id_state_dir / "keys" / "repo-jwt.pem"
        config.write_text(sluice_config(upstream.url))
        id_config.write_text(sluice_config(upstream.url, jwt_key_file=jwt_key))
        checked, total = rules_checked(config)
        agent_token = issue_agent_token(id_state_dir)
        sluice = start_sluice(children, "sluice", config, state_dir)
        sluice_id = start_sluice(children, "sluice+id", id_config, id_state_dir)

        servers = {"direct": upstream, "minimal": minimal, "sluice": sluice}
        servers["sluice+id"] = sluice_id
        pids = {case: child.proc.pid for case, child in servers.items()}
        processes = {case: child.name for case, child in servers.items()}
        urls = {
            "direct": upstream.url + THROUGHPUT_PATH,
            "minimal": minimal.url + THROUGHPUT_PATH,
            "sluice": f"{sluice.url}/{TARGET}{THROUGHPUT_PATH}",
            "sluice+id": f"{sluice_id.url}/{TARGET}{THROUGHPUT_PATH}",
        }
        headers = {case: [] for case in CASES}
        headers["sluice+id"] = [f"Authorization: Bearer {agent_token}"]
        print(f"load generator: {loadgen}")
        print(
            "servers: " + ", ".join(f"{c.name} pid {c.proc.pid} {c.url}" for c in servers.values())
        )
        print(f"policy: {total} rules; the benchmark request is tested against {checked}")
        notes = sanity_checks(
            urls,
            headers,
            {"sluice": (sluice, state_dir), "sluice+id": (sluice_id, id_state_dir)},
            agent_token,
            jwt_key,
        )
        for note in notes:
            print(note)
        print(
            f"throughput: {duration:g} s per case after {warmup:g} s warm-up, "
            f"GET {THROUGHPUT_PATH} (1 KiB body)",
            flush=True,
        )

        results: list[LoadResult] = []
        for conc in args.concurrency:
            for case in CASES:
                result = measure(
                    wrk,
                    workdir,
                    case,
                    urls[case],
                    conc,
                    duration,
                    warmup,
                    pids[case],
                    processes[case],
                    list(pids.values()),
                    headers[case],
                )
                children.check_alive()
                results.append(result)
                print(
                    f"  {case:<9} c={conc:<3} {result.rps:>8.0f} req/s  p50 "
                    f"{result.p50_ms:.3f} ms  p99 {result.p99_ms:.3f} ms  "
                    f"cpu {result.cpu_us_per_req} us/req",
                    flush=True,
                )

        streams: list[StreamResult] = []
        if stream_size > 0:
            print(f"streaming {stream_size / GIB:.2f} GiB, {CHUNK // 1024} KiB chunks", flush=True)
            path = STREAM_PATH.format(size=stream_size)
            stream_urls = {
                "direct": upstream.url + path,
                "minimal": minimal.url + path,
                "sluice": f"{sluice.url}/{TARGET}{path}",
            }
            for case in STREAM_CASES:
                result = measure_stream(
                    case,
                    stream_urls[case],
                    stream_size,
                    pids[case],
                    processes[case],
                    list(pids.values()),
                )
                children.check_alive()
                streams.append(result)
                print(
                    f"  {case:<9} {result.mb_per_s:>7.0f} MB/s  RSS {result.rss_baseline_mib}"
                    f" -> peak {result.rss_peak_mib} MiB",
                    flush=True,
                )

        ratios = report(results, streams, loadgen, machine)
        profile_note = None
        if args.profile:
            profile_note = profile_sluice(
                wrk, workdir, urls["sluice"], pids["sluice"], duration, args.profile.absolute()
            )
            print(profile_note)
        elapsed = time.monotonic() - started
        print(f"\ntotal {elapsed:.0f} s")
        if args.json:
            document = {
                "command": " ".join([shown(sys.executable), *sys.argv]),
                "machine": machine,
                "load_generator": loadgen,
                "duration_s": duration,
                "warmup_s": warmup,
                "request": f"GET {THROUGHPUT_PATH} (sluice: /{TARGET}{THROUGHPUT_PATH})",
                "sluice_rules": total,
                "sluice_rules_checked": checked,
                "identity_case": "sluice+id: identity mode local (one agent token, sent by the "
                "load generator) and a jwt credential (ES256, ttl 5m) on the target",
                "sanity": notes,
                "throughput": [asdict(r) for r in results],
                "streaming": [asdict(s) for s in streams],
                "ratios": ratios,
                "profile": profile_note,
                "elapsed_s": round(elapsed, 1),
            }
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 0
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
