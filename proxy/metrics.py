"""Prometheus metrics folded from the same lifecycle events the console sees.

The hot path only bumps plain counters (a dict increment and a bisect); the Prometheus
families are built from them when ``/metrics`` is scraped, by prometheus_client's own
exposition code. Its metric objects take a lock and allocate per update, which showed up
in the per-request cost.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.events import Event

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Latency:
    """One histogram series: per-bucket counts (non-cumulative) plus sum."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*map(str, _BUCKETS), "+Inf"), self.buckets, strict=True):
            running += count
            out.append((bound, running))
        return out


class ProxyMetrics(Collector):
    #: The only events ``observe`` looks at; register it for these alone.
    EVENT_TYPES = (
        "request.completed",
        "request.failed",
        "config.reloaded",
        "config.reload_failed",
    )

    def __init__(self, in_flight: Callable[[], float] | None = None) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.latency: dict[str, _Latency] = {}
        self.upstream_errors: Counter[tuple[str, str]] = Counter()
        self.config_reloads: Counter[str] = Counter()
        self._in_flight = in_flight
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def observe(self, event: Event) -> None:
        data = event.data
        kind = event.type
        if kind == "request.completed" or kind == "request.failed":
            decision = data.get("decision") or "none"
            self.requests[(decision, str(data.get("status") or 0))] += 1
            duration = data.get("duration_ms")
            if duration is not None:
                series = self.latency.get(decision)
                if series is None:
                    series = self.latency[decision] = _Latency()
                series.observe(duration / 1000)
            if kind == "request.failed" and data.get("upstream_error"):
                self.upstream_errors[(data.get("target") or "none", data["upstream_error"])] += 1
        elif kind == "config.reloaded":
            self.config_reloads["ok"] += 1
        elif kind == "config.reload_failed":
            self.config_reloads["rejected"] += 1

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "sluice_requests",
            "Requests finished, by policy decision and response status",
            labels=("decision", "status"),
        )
        for labels, count in sorted(self.requests.items()):
            requests.add_metric(labels, count)
        yield requests
        latency = HistogramMetricFamily(
            "sluice_request_duration_seconds",
            "Time from request received to response completed",
            labels=("decision",),
        )
        for decision, series in sorted(self.latency.items()):
            latency.add_metric([decision], series.cumulative(), series.total)
        yield latency
        errors = CounterMetricFamily(
            "sluice_upstream_errors",
            "Upstream failures, by target and kind",
            labels=("target", "kind"),
        )
        for labels, count in sorted(self.upstream_errors.items()):
            errors.add_metric(labels, count)
        yield errors
        reloads = CounterMetricFamily(
            "sluice_config_reloads", "Config reload attempts", labels=("result",)
        )
        for result, count in sorted(self.config_reloads.items()):
            reloads.add_metric([result], count)
        yield reloads
        in_flight = self._in_flight() if self._in_flight is not None else 0
        yield GaugeMetricFamily(
            "sluice_requests_in_flight", "Requests being handled", value=in_flight
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
