"""The report: machine facts, the results tables, the ratios with their verdicts."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from harness import GIB, ID_RATIO_TARGET, NOISE_PCT, RATIO_TARGET, REPO_ROOT, RSS_TARGET_MIB
from loadgen import LoadResult, StreamResult


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    revision = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        revision = f"{head}{' + uncommitted changes' if dirty else ''}" if head else revision
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "revision": revision,
    }


def shown(path: str) -> str:
    """A path relative to the repository when it is inside it (``.venv/bin/python``)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).absolute().relative_to(REPO_ROOT))
    return path


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(
    results: list[LoadResult], streams: list[StreamResult], loadgen: str, machine: dict[str, Any]
) -> dict[str, Any]:
    print()
    print(
        f"machine: {machine['nproc']} CPUs ({machine['cpu']}), Python {machine['python']}, "
        f"aiohttp {machine['aiohttp']}; sluice at {machine['revision']}"
    )
    print(f"load generator: {loadgen}")
    print()
    header = (
        f"{'case':<9} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'CPU us/req':>11} {'CPU %':>6}  {'(process)':<9} {'other %':>7}  errors"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        cpu = f"{r.cpu_us_per_req:.0f}" if r.cpu_us_per_req is not None else "-"
        util = f"{r.cpu_util_pct:.0f}" if r.cpu_util_pct is not None else "-"
        errors = ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "0"
        other = f"{r.other_cpu_pct:.0f}" if r.other_cpu_pct is not None else "-"
        print(
            f"{r.case:<9} {r.concurrency:>4} {r.rps:>9.0f} {r.p50_ms:>8.3f} {r.p99_ms:>8.3f} "
            f"{cpu:>11} {util:>6}  {r.cpu_process:<9} {other:>7}  {errors}"
        )
    print(
        "CPU us/req and CPU % are the serving process's (the upstream for direct); other % is "
        "CPU used by\nprocesses outside the benchmark during the case, in % of one core. "
        "sluice+id: identity (local\ntokens) and a jwt credential on the target, same policy."
    )
    noisy = [r for r in results if (r.other_cpu_pct or 0) > NOISE_PCT]
    if noisy:
        print(
            f"WARNING: other processes used more than {NOISE_PCT}% of a core during "
            f"{len(noisy)} case(s): the machine was not quiet, the numbers are noisy."
        )
    print()
    if streams:
        header = (
            f"{'stream':<9} {'GiB':>5} {'MB/s':>8} {'RSS before':>11} {'RSS peak':>9} "
            f"{'growth':>8} {'other %':>8}  (process; RSS in MiB)"
        )
        print(header)
        print("-" * len(header))
        for s in streams:
            print(
                f"{s.case:<9} {s.bytes / GIB:>5.2f} {s.mb_per_s:>8.0f} "
                f"{s.rss_baseline_mib:>11.1f} {s.rss_peak_mib:>9.1f} {s.rss_growth_mib:>8.1f} "
                f"{s.other_cpu_pct or 0:>8.0f}  {s.rss_process}"
            )
        print()

    by = {(r.case, r.concurrency): r for r in results}
    ratios: dict[str, Any] = {}
    for conc in sorted({r.concurrency for r in results}):
        sluice, minimal, direct = (
            by.get(("sluice", conc)),
            by.get(("minimal", conc)),
            by.get(("direct", conc)),
        )
        if sluice and minimal and minimal.rps:
            ratio = sluice.rps / minimal.rps
            ratios[f"sluice_over_minimal_rps_c{conc}"] = {
                "value": round(ratio, 3),
                "target": f">= {RATIO_TARGET}",
                "verdict": verdict(ratio >= RATIO_TARGET),
            }
            print(
                f"sluice/minimal req/s at c={conc:<2}: {ratio:5.2f}  (target >= {RATIO_TARGET})"
                f"  {verdict(ratio >= RATIO_TARGET)}"
            )
        if minimal and direct and direct.rps:
            ratios[f"minimal_over_direct_rps_c{conc}"] = round(minimal.rps / direct.rps, 3)
            print(f"  (context) minimal/direct req/s at c={conc}: {minimal.rps / direct.rps:.2f}")
        if sluice and minimal and direct and conc == 1:
            added = sluice.p50_ms - direct.p50_ms
            floor = minimal.p50_ms - direct.p50_ms
            ratios["sluice_added_p50_ms_c1"] = round(added, 3)
            ratios["minimal_added_p50_ms_c1"] = round(floor, 3)
            print(
                f"  (context) p50 latency added at c=1: sluice {added:.3f} ms, "
                f"minimal {floor:.3f} ms"
            )
    for conc in sorted({r.concurrency for r in results}):
        sluice, with_id = by.get(("sluice", conc)), by.get(("sluice+id", conc))
        if not (sluice and with_id and sluice.rps):
            continue
        ratio = with_id.rps / sluice.rps
        ratios[f"sluice_id_over_sluice_rps_c{conc}"] = {
            "value": round(ratio, 3),
            "target": f">= {ID_RATIO_TARGET}",
            "verdict": verdict(ratio >= ID_RATIO_TARGET),
        }
        print(
            f"sluice+id/sluice req/s at c={conc:<2}: {ratio:5.2f}  (target >= {ID_RATIO_TARGET})"
            f"  {verdict(ratio >= ID_RATIO_TARGET)}"
        )
        if with_id.cpu_us_per_req is not None and sluice.cpu_us_per_req is not None:
            added = with_id.cpu_us_per_req - sluice.cpu_us_per_req
            ratios[f"sluice_id_added_cpu_us_c{conc}"] = round(added, 1)
            print(
                f"  (context) CPU per request added by identity + credential at c={conc}: "
                f"{added:+.0f} us ({sluice.cpu_us_per_req:.0f} -> {with_id.cpu_us_per_req:.0f})"
            )
    sluice_stream = next((s for s in streams if s.case == "sluice"), None)
    if sluice_stream is not None:
        ok = sluice_stream.rss_growth_mib < RSS_TARGET_MIB
        ratios["sluice_rss_growth_1gib_mib"] = {
            "value": sluice_stream.rss_growth_mib,
            "target": f"< {RSS_TARGET_MIB:.0f}",
            "verdict": verdict(ok),
        }
        print(
            f"sluice RSS growth streaming {sluice_stream.bytes / GIB:.2f} GiB: "
            f"{sluice_stream.rss_growth_mib:.1f} MiB  (target < {RSS_TARGET_MIB:.0f} MiB)  "
            f"{verdict(ok)}"
        )
    minimal_stream = next((s for s in streams if s.case == "minimal"), None)
    if sluice_stream and minimal_stream and minimal_stream.mb_per_s:
        ratios["sluice_over_minimal_stream_mbps"] = round(
            sluice_stream.mb_per_s / minimal_stream.mb_per_s, 3
        )
        print(
            f"  (context) sluice/minimal streaming MB/s: "
            f"{sluice_stream.mb_per_s / minimal_stream.mb_per_s:.2f}"
        )
    return ratios
