#!/usr/bin/env python3
"""Forward-proxy benchmark: Sluice intercepting HTTPS against mitmdump, in the same run.

Run from the repository root::

    .venv/bin/python tests/benchmarks/bench_forward.py [--quick] [--json FILE]

Both proxies sit between a client and the same local HTTPS upstream (127.0.0.1, a
certificate from a throwaway CA that both proxies are told to trust) and both intercept:
the client sends ``CONNECT``, then speaks TLS to the proxy, verifying the proxy's own CA
(Sluice's ``<state_dir>/ca``, mitmproxy's confdir), so a request that succeeds went
through interception. Sluice runs with identity "none", an ``[[egress]]`` entry for the
upstream with ``tls = "intercept"``, masking on (the default) and recording off. It
measures

* throughput: requests/s over ``--concurrency`` keep-alive intercepted connections (each
  one ``CONNECT`` and one TLS handshake, then ``GET``s of a 1 KiB body), with p50/p99 and
  the proxy process's CPU per request; target: Sluice >= 3x mitmdump;
* new connections: one at a time, ``CONNECT`` + TLS handshake + one ``GET`` + close,
  p50/p99 latency.

The client is blocking ``ssl`` sockets in threads spread over two processes (C-level TLS,
about 20 us of CPU a request), so neither it nor the threaded upstream is the bottleneck
on two cores. mitmproxy comes from PyPI into its own venv (``.venv-mitm/``, git-ignored;
created with ``python3 -m venv`` + pip when missing): its pins conflict with ours. Exit 0
unless something crashed: missing the target is a result, not a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from forward_roles import (  # noqa: E402
    BODY_1K,
    Client,
    addr,
    ensure_mitmdump,
    free_port,
    mitm_version,
    role_client,
    role_upstream,
    sluice_config,
    upstream_ca,
    wait_for_file,
)
from harness import REPO_ROOT, Children, CpuLedger, cpu_seconds  # noqa: E402
from report import machine_info, shown, verdict  # noqa: E402

RATIO_TARGET = 3.0
CASES = ("sluice", "mitmdump")


# -- measuring -------------------------------------------------------------------------


def _pct(sorted_us: list[float], p: float) -> float:
    if not sorted_us:
        return 0.0
    return sorted_us[min(len(sorted_us) - 1, math.ceil(p / 100 * len(sorted_us)) - 1)] / 1000


def throughput(
    proxy: str, target: str, cafile: str, conc: int, times: tuple[float, float], pids: list[int]
) -> dict[str, Any]:
    """Run the client processes once. CPU is read over the measured window (a little short
    of it, while every process is still alive): the proxy's (``pids[0]``), the clients'
    (to show they are not the bottleneck) and everybody else's (noise)."""
    warmup, duration = times
    processes = min(2, conc)
    begin = time.time() + 1.0  # time for the clients to connect
    start, end = begin + warmup, begin + warmup + duration
    argv = [sys.executable, str(Path(__file__).resolve()), "--role", "client"]
    procs = []
    for index in range(processes):
        threads = conc // processes + (1 if index < conc % processes else 0)
        role_args = [proxy, target, cafile, str(threads), str(start), str(end)]
        procs.append(subprocess.Popen([*argv, *role_args], stdout=subprocess.PIPE, cwd=REPO_ROOT))
    clients = [proc.pid for proc in procs]
    time.sleep(max(0.0, start - time.time()))
    ledger = CpuLedger([*pids, *clients])
    window = time.perf_counter()
    proxy_before = cpu_seconds(pids[0])
    client_before = sum(cpu_seconds(pid) for pid in clients)
    time.sleep(max(0.0, end - 0.2 - time.time()))
    proxy_cpu = cpu_seconds(pids[0]) - proxy_before
    client_cpu = sum(cpu_seconds(pid) for pid in clients) - client_before
    other = ledger.other_cpu_pct()
    window = time.perf_counter() - window
    latencies: list[float] = []
    errors: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=duration + warmup + 60)
        data = json.loads(out.decode().strip().splitlines()[-1])
        latencies += data["latencies_us"]
        errors += data["errors"]
    latencies.sort()
    requests = len(latencies)
    in_window = requests * window / duration
    return {
        "concurrency": conc,
        "requests": requests,
        "rps": round(requests / duration, 1),
        "p50_ms": round(_pct(latencies, 50), 3),
        "p99_ms": round(_pct(latencies, 99), 3),
        "cpu_us_per_req": round(proxy_cpu / in_window * 1e6, 1) if requests else None,
        "cpu_pct": round(proxy_cpu / window * 100),
        "client_cpu_pct": round(client_cpu / window * 100),
        "other_cpu_pct": other,
        "errors": errors[:5],
        "error_count": len(errors),
    }


def new_connections(proxy: str, target: str, cafile: str, count: int) -> dict[str, Any]:
    """Sequential fresh connections: CONNECT + TLS handshake + one GET, then close."""
    proxy_addr, target_addr = addr(proxy), addr(target)
    times: list[float] = []
    errors: list[str] = []
    for index in range(count + 5):
        began = time.perf_counter()
        try:
            client = Client(proxy_addr, target_addr, cafile)
            try:
                client.get()
            finally:
                client.close()
        except (OSError, ssl.SSLError, ValueError) as exc:
            errors.append(str(exc))
            continue
        if index >= 5:  # the first few fill the proxies' certificate caches
            times.append((time.perf_counter() - began) * 1e6)
    times.sort()
    return {
        "connections": len(times),
        "p50_ms": round(_pct(times, 50), 3),
        "p99_ms": round(_pct(times, 99), 3),
        "errors": errors[:5],
        "error_count": len(errors),
    }


def _on_sigterm(_signum: int, _frame: Any) -> None:
    raise SystemExit(143)


def measure_rounds(
    found: dict[str, Any], cases: list[str], conc: int, times: tuple[float, float], rounds: int
) -> dict[str, Any]:
    """Alternate the proxies round by round and keep each one's median round by req/s, so
    a burst of other work on the machine does not land on one proxy only."""
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    for number in range(1, rounds + 1):
        for case in cases:
            proxy, cafile, pid = found[case]
            pids = [pid, found["upstream_pid"]]
            result = throughput(proxy, found["target"], cafile, conc, times, pids)
            runs[case].append(result)
            print(
                f"  {case:<9} round {number}: {result['rps']:>6.0f} req/s  p50 "
                f"{result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms  cpu "
                f"{result['cpu_us_per_req']} us/req ({result['cpu_pct']}% of a core)  client "
                f"{result['client_cpu_pct']}%  other {result['other_cpu_pct']}%  errors "
                f"{result['error_count']}",
                flush=True,
            )
    medians = {}
    for case, items in runs.items():
        ordered = sorted(items, key=lambda item: item["rps"])
        medians[case] = {**ordered[len(ordered) // 2], "rounds_rps": [r["rps"] for r in items]}
    return medians


def verdicts(results: dict[str, Any], fresh: dict[str, Any], conc: int) -> dict[str, Any]:
    """The medians side by side, the throughput ratio with its verdict, latency context."""
    print("\nmedian round   req/s   p50 ms   p99 ms  CPU us/req | new conn p50 ms  p99 ms")
    for case, result in results.items():
        print(
            f"  {case:<9} {result['rps']:>8.0f} {result['p50_ms']:>8.3f} {result['p99_ms']:>8.3f}"
            f" {result['cpu_us_per_req']:>11} | {fresh[case]['p50_ms']:>15.3f}"
            f" {fresh[case]['p99_ms']:>7.3f}"
        )
    ratios: dict[str, Any] = {}
    if len(results) < 2 or not results["mitmdump"]["rps"]:
        return ratios
    ratio = results["sluice"]["rps"] / results["mitmdump"]["rps"]
    ok = ratio >= RATIO_TARGET and not results["sluice"]["error_count"]
    ratios["sluice_over_mitmdump_rps"] = {
        "value": round(ratio, 2),
        "target": f">= {RATIO_TARGET:g}",
        "verdict": verdict(ok),
    }
    print(
        f"\nsluice/mitmdump req/s at c={conc}: {ratio:.2f}  (target >= {RATIO_TARGET:g})  "
        f"{verdict(ok)}"
    )
    cpu = results["sluice"]["cpu_us_per_req"], results["mitmdump"]["cpu_us_per_req"]
    if cpu[0] and cpu[1]:
        ratios["mitmdump_over_sluice_cpu_per_request"] = round(cpu[1] / cpu[0], 2)
        print(f"  (context) CPU per request: mitmdump/sluice {cpu[1] / cpu[0]:.2f}")
    for key in ("p50_ms", "p99_ms"):
        if fresh["sluice"][key]:
            value = fresh["mitmdump"][key] / fresh["sluice"][key]
            ratios[f"mitmdump_over_sluice_new_connection_{key}"] = round(value, 2)
            print(f"  (context) new-connection {key[:3]}: mitmdump/sluice {value:.2f}")
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~3 s per case instead of ~10 s")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write results as JSON")
    parser.add_argument("--duration", type=float, help="seconds per measured case")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up before each case")
    parser.add_argument("--concurrency", type=int, default=8, help="keep-alive connections")
    parser.add_argument("--rounds", type=int, help="alternating rounds, median kept (3)")
    parser.add_argument("--connections", type=int, help="new connections measured (200)")
    parser.add_argument("--only", choices=CASES, help="measure one proxy only")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("role_args", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def start_proxies(children: Children, workdir: Path, cases: list[str]) -> dict[str, Any]:
    """The upstream, then each proxy; returns per case (proxy address, CA file, pid)."""
    ca, cert, key = upstream_ca(workdir)
    ready = re.compile(r"READY (\d+)")
    role = [sys.executable, str(Path(__file__).resolve()), "--role"]
    upstream = children.start("upstream", [*role, "upstream", str(cert), str(key)], ready, 20)
    target = f"127.0.0.1:{upstream.url}"
    found: dict[str, Any] = {"target": target, "upstream_pid": upstream.proc.pid}
    if "sluice" in cases:
        config = sluice_config(workdir, int(upstream.url), ca)
        state = workdir / "state"
        from proxy.tls import LocalCA

        argv = [sys.executable, "-m", "proxy", "proxy", "-c", str(config)]
        listening = re.compile(r"sluice proxy listening on http://(\S+)")
        child = children.start("sluice", [*argv, "--state-dir", str(state)], listening, 30)
        cafile = LocalCA.load_or_create(state).cert_path  # the proxy loads the same one
        found["sluice"] = (child.url, str(cafile), child.proc.pid)
    binary = None
    if "mitmdump" in cases:
        try:
            binary = ensure_mitmdump()
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"mitmdump unavailable ({exc}): measuring Sluice alone, no ratio", flush=True)
            cases.remove("mitmdump")
    if binary is not None:
        found["mitmdump_version"] = mitm_version(binary)
        port, confdir = free_port(), workdir / "mitm"
        argv = [binary, "--listen-host", "127.0.0.1", "--listen-port", str(port)]
        argv += ["--set", f"confdir={confdir}", "--set", f"ssl_verify_upstream_trusted_ca={ca}"]
        argv += ["--set", "flow_detail=0"]
        listening = re.compile(r"proxy listening at \S+?:(\d+)")
        child = children.start("mitmdump", argv, listening, 60)
        cafile = confdir / "mitmproxy-ca-cert.pem"
        wait_for_file(cafile, 10)
        found["mitmdump"] = (f"127.0.0.1:{port}", str(cafile), child.proc.pid)
    return found


def sanity(case: str, proxy: str, target: str, cafile: str) -> str:
    """One request through the proxy, verified against the proxy's CA: it intercepted."""
    client = Client(addr(proxy), addr(target), cafile)
    try:
        size = client.get()
        issuer = client.tls.getpeercert() or {}
    finally:
        client.close()
    names = dict(x[0] for x in issuer.get("issuer", ()))
    if size != len(BODY_1K):
        raise RuntimeError(f"{case}: body of {size} bytes, expected {len(BODY_1K)}")
    return f"{case}: intercepted, leaf issued by {names.get('commonName', '?')!r}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "upstream":
        role_upstream(*args.role_args)
        return 0
    if args.role == "client":
        proxy, target, cafile, threads, start, end = args.role_args
        role_client(proxy, target, cafile, int(threads), float(start), float(end))
        return 0

    duration = args.duration or (3.0 if args.quick else 10.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    count = args.connections or (50 if args.quick else 200)
    args.rounds = args.rounds or (1 if args.quick else 3)
    cases = [args.only] if args.only else list(CASES)
    signal.signal(signal.SIGTERM, _on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="sluice-bench-forward-"))
    children = Children(workdir)
    started = time.monotonic()
    document: dict[str, Any] = {
        "command": " ".join([shown(sys.executable), *sys.argv]),
        "machine": machine_info(),
    }
    try:
        found = start_proxies(children, workdir, cases)
        target = found["target"]
        machine = document["machine"]
        print(
            f"machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}; "
            f"sluice at {machine['revision']}; {found.get('mitmdump_version', 'no mitmdump')}"
        )
        document["mitmdump"] = found.get("mitmdump_version")
        document["sanity"] = [
            sanity(case, found[case][0], target, found[case][1]) for case in cases
        ]
        for note in document["sanity"]:
            print(note)
        print(
            f"throughput: {args.concurrency} keep-alive intercepted connections, {duration:g} s "
            f"after {warmup:g} s warm-up, GET of a 1 KiB body, {args.rounds} alternating "
            f"round(s); upstream HTTPS on {target}",
            flush=True,
        )
        results = measure_rounds(found, cases, args.concurrency, (warmup, duration), args.rounds)
        children.check_alive()
        print(f"new connections: {count} sequential CONNECT + TLS handshake + GET + close")
        fresh: dict[str, Any] = {}
        for case in cases:
            proxy, cafile, _ = found[case]
            fresh[case] = new_connections(proxy, target, cafile, count)
            children.check_alive()
            print(
                f"  {case:<9} p50 {fresh[case]['p50_ms']:.3f} ms  p99 "
                f"{fresh[case]['p99_ms']:.3f} ms  errors {fresh[case]['error_count']}",
                flush=True,
            )
        ratios = verdicts(results, fresh, args.concurrency)
        elapsed = time.monotonic() - started
        print(f"\ntotal {elapsed:.0f} s")
        if args.json:
            document.update(
                duration_s=duration,
                warmup_s=warmup,
                concurrency=args.concurrency,
                throughput=results,
                new_connections=fresh,
                ratios=ratios,
                elapsed_s=round(elapsed, 1),
            )
            args.json.write_text(json.dumps(document, indent=2) + "\n")
            print(f"results written to {args.json}")
        return 0
    finally:
        children.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
