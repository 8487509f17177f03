"""Prometheus metrics folded from the same lifecycle events the console sees."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy.events import Event

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ProxyMetrics:
    def __init__(self, in_flight: Callable[[], float] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sluice_requests",
            "Requests finished, by policy decision and response status",
            ("decision", "status"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "sluice_request_duration_seconds",
            "Time from request received to response completed",
            ("decision",),
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "sluice_upstream_errors",
            "Upstream failures, by target and kind",
            ("target", "kind"),
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "sluice_config_reloads", "Config reload attempts", ("result",), registry=self.registry
        )
        self.in_flight = Gauge(
            "sluice_requests_in_flight", "Requests being handled", registry=self.registry
        )
        if in_flight is not None:
            self.in_flight.set_function(in_flight)

    #: The only events ``observe`` looks at; register it for these alone.
    EVENT_TYPES = (
        "request.completed",
        "request.failed",
        "config.reloaded",
        "config.reload_failed",
    )

    def observe(self, event: Event) -> None:
        data = event.data
        if event.type in ("request.completed", "request.failed"):
            decision = str(data.get("decision") or "none")
            self.requests.labels(decision, str(data.get("status") or 0)).inc()
            if (duration := data.get("duration_ms")) is not None:
                self.latency.labels(decision).observe(duration / 1000)
            if event.type == "request.failed" and data.get("upstream_error"):
                self.upstream_errors.labels(
                    str(data.get("target") or "none"), str(data["upstream_error"])
                ).inc()
        elif event.type == "config.reloaded":
            self.config_reloads.labels("ok").inc()
        elif event.type == "config.reload_failed":
            self.config_reloads.labels("rejected").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
