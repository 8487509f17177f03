"""Console benchmark: 100,000 flows fed at 5,000 flows/s into the app, headless.

Measures, while the stream runs and at the end with 100,000 flows held:
  * frame time: applying a tick's batch plus drawing every visible row (the work a
    refresh costs the UI), p50 / p95 / max;
  * event-to-row latency: from the moment a flow's first event is queued until its row is
    drawn, for every 100th flow;
  * memory: Python heap growth (tracemalloc) and the process RSS.
Targets: < 20 ms per frame at 100,000 flows, < 200 ms event to row. Prints PASS/MISS for
each and exits 0 either way (a benchmark reports, it does not gate).

    .venv/bin/python tests/benchmarks/bench_console.py [--flows N] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from console.app import SluiceConsole
from console.flowview import FlowView
from console.model import Flow, FlowStore

FRAME_TARGET_MS = 20.0
LATENCY_TARGET_MS = 200.0
METHODS = ("GET", "GET", "GET", "POST", "PUT")
DECISIONS = (("allowed", 200), ("allowed", 200), ("denied", 403), ("allowed", 500))


def flow_events(index: int, now: float) -> list[dict[str, Any]]:
    """A flow's life as the proxy reports it: received, decided, completed."""
    request_id = f"bench{index:010x}"
    decision, status = DECISIONS[index % len(DECISIONS)]
    seq = index * 3
    return [
        {
            "type": "request.received",
            "seq": seq + 1,
            "ts": now,
            "request_id": request_id,
            "method": METHODS[index % len(METHODS)],
            "target": f"svc{index % 7}",
            "path": f"/api/v1/items/{index}/detail",
            "query": "",
            "host": "127.0.0.1:8700",
            "client": "127.0.0.1",
            "subject": f"agent-{index % 13}",
            "session": f"s{index % 13}",
            "groups": ["agents"],
        },
        {
            "type": "request.decided",
            "seq": seq + 2,
            "ts": now,
            "request_id": request_id,
            "decision": decision,
            "rule": "bench-rule",
            "reason": "benchmark",
            "code": decision,
        },
        {
            "type": "request.completed",
            "seq": seq + 3,
            "ts": now,
            "request_id": request_id,
            "status": status,
            "decision": decision,
            "bytes_out": 100 + index % 5000,
            "duration_ms": 1.5 + index % 40,
            "masked": 1 if index % 50 == 0 else 0,
        },
    ]


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1e6


def store_heap_mb(flows: int) -> float:
    """The heap a full FlowStore holds (measured apart: tracemalloc slows everything)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = FlowStore(flows)
    for index in range(flows):
        for event in flow_events(index, 1.0):
            store.apply(event)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del store
    return held / 1e6


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def run(flows: int, rate: float) -> dict[str, Any]:
    app = SluiceConsole(max_flows=flows)
    frames: list[float] = []
    watched: dict[str, float] = {}
    latencies: list[float] = []

    def drawn(flow: Flow) -> None:
        queued = watched.pop(flow.request_id, None)
        if queued is not None:
            latencies.append((time.perf_counter() - queued) * 1000)

    tick = app._tick
    ticks: list[float] = []
    draws: list[float] = []
    queued_at: list[float] = []
    applied: list[float] = []

    def timed_tick() -> None:
        started = time.perf_counter()
        pending, queued_at[:] = list(queued_at), []
        tick()
        done = time.perf_counter()
        ticks.append((done - started) * 1000)
        applied.extend((done - at) * 1000 for at in pending)

    def timed_draw(crop: Any) -> Any:
        started = time.perf_counter()
        lines = render_lines(crop)
        draws.append((time.perf_counter() - started) * 1000)
        if ticks:  # a frame: the last batch applied, plus drawing what the screen shows
            frames.append(ticks[-1] + draws[-1])
        return lines

    app._tick = timed_tick  # type: ignore[method-assign]
    gc.collect()
    rss_before = rss_mb()
    async with app.run_test(size=(160, 50)) as pilot:
        view = app.query_one(FlowView)
        view.on_row_drawn = drawn
        render_lines = view.render_lines
        view.render_lines = timed_draw  # type: ignore[method-assign]
        started = time.perf_counter()
        sent = 0
        while sent < flows:
            due = min(flows, int((time.perf_counter() - started) * rate) + 1)
            batch: list[dict[str, Any]] = []
            now = time.time()
            for index in range(sent, due):
                batch.extend(flow_events(index, now))
                if index % 100 == 0:
                    watched[f"bench{index:010x}"] = time.perf_counter()
            app.feed(batch)
            queued_at.append(time.perf_counter())
            sent = due
            await asyncio.sleep(0.01)
        feed_seconds = time.perf_counter() - started
        await pilot.pause(0.3)
        streaming_frames = list(frames)
        streaming_ticks, streaming_draws = list(ticks), list(draws)
        frames.clear()
        ticks.clear()
        draws.clear()
        # Steady state at full size: keep scrolling with new flows arriving.
        for round_ in range(40):
            app.feed(flow_events(flows + round_, time.time()))
            await pilot.pause(0.05)
        await pilot.press("pageup", "pageup", "up", "up")
        await pilot.pause(0.2)
        full_frames = list(frames)
        filter_started = time.perf_counter()
        app.apply_filter("method:POST status:>=400")
        while app.store.rebuilding:
            await pilot.pause(0.01)
        filter_seconds = time.perf_counter() - filter_started
        rss_full = rss_mb()
        held = len(app.store)
    return {
        "flows": flows,
        "held": held,
        "feed_seconds": feed_seconds,
        "streaming_frames": streaming_frames,
        "full_frames": full_frames,
        "latencies": latencies,
        "applied": applied,
        "ticks": streaming_ticks,
        "draws": streaming_draws,
        "unseen": len(watched),
        "rss_growth_mb": rss_full - rss_before,
        "rss_mb": rss_full,
        "store_mb": store_heap_mb(flows),
        "filter_seconds": filter_seconds,
    }


def report(result: dict[str, Any]) -> None:
    frames = result["streaming_frames"] + result["full_frames"]
    full = result["full_frames"] or frames
    lat = result["latencies"]
    print(
        f"console benchmark: {result['flows']:,} flows fed in {result['feed_seconds']:.1f}s "
        f"({result['flows'] / result['feed_seconds']:,.0f} flows/s), {result['held']:,} held"
    )
    print(
        f"  frames while streaming: n={len(result['streaming_frames'])} "
        f"p50={percentile(result['streaming_frames'], 0.5):.2f} ms "
        f"p95={percentile(result['streaming_frames'], 0.95):.2f} ms "
        f"max={max(result['streaming_frames'] or [0]):.2f} ms"
    )
    print(
        f"  frames at {result['held']:,} flows: n={len(full)} p50={percentile(full, 0.5):.2f} ms "
        f"p95={percentile(full, 0.95):.2f} ms max={max(full or [0]):.2f} ms"
    )
    applied = result["applied"]
    print(
        f"  tick (apply batch) while streaming: p50={percentile(result['ticks'], 0.5):.2f} ms "
        f"p95={percentile(result['ticks'], 0.95):.2f} ms; draw of the list: "
        f"p50={percentile(result['draws'], 0.5):.2f} ms "
        f"p95={percentile(result['draws'], 0.95):.2f} ms"
    )
    print(
        f"  event queued to row in view (every batch): n={len(applied)} "
        f"p50={percentile(applied, 0.5):.1f} ms p95={percentile(applied, 0.95):.1f} ms "
        f"max={max(applied or [0]):.1f} ms"
    )
    print(
        f"  event to drawn row (watched flows): n={len(lat)} p50={percentile(lat, 0.5):.1f} ms "
        f"p95={percentile(lat, 0.95):.1f} ms max={max(lat or [0]):.1f} ms "
        f"(rows scrolled past unseen: {result['unseen']})"
    )
    print(
        f"  memory: RSS {result['rss_mb']:.0f} MB (+{result['rss_growth_mb']:.0f} MB while "
        f"filling); the flow store alone holds {result['store_mb']:.1f} MB for "
        f"{result['flows']:,} flows ({result['store_mb'] * 1e6 / result['flows']:.0f} B/flow)"
    )
    print(
        f"  re-filter of {result['held']:,} flows (in steps between frames): "
        f"{result['filter_seconds'] * 1000:.0f} ms"
    )
    frame_p95 = percentile(full, 0.95)
    lat_p95 = max(percentile(lat, 0.95) if lat else 0.0, percentile(applied, 0.95))
    verdict = "PASS" if frame_p95 < FRAME_TARGET_MS else "MISS"
    held = result["held"]
    print(f"{verdict} frame p95 {frame_p95:.2f} ms at {held:,} flows (< {FRAME_TARGET_MS:g} ms)")
    verdict = "PASS" if lat_p95 < LATENCY_TARGET_MS else "MISS"
    print(f"{verdict} event-to-row p95 {lat_p95:.1f} ms (< {LATENCY_TARGET_MS:g} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=5_000.0, help="flows per second")
    args = parser.parse_args()
    report(asyncio.run(run(args.flows, args.rate)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
