"""The admin API over real sockets: auth, health, flows, metrics and the event stream."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from helpers import (
    admin_token,
    client_session,
    closed_port_url,
    json_of,
    running_proxy,
    upstream_app,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import load_config
from proxy.events import EventBus
from proxy.flows import FlowTable
from proxy.metrics import ProxyMetrics
from proxy.reload import ConfigHolder
from proxy.server.admin import AdminApi
from proxy.server.runtime import ProxyRuntime

ENDPOINTS = ["/api/health", "/api/flows", "/api/events", "/metrics", "/api/nope", "/"]
RULES = [
    {"name": "no-env", "action": "deny", "path": "**/.env", "reason": "credentials"},
    {"name": "reads", "action": "allow", "method": "GET"},
]


@contextlib.asynccontextmanager
async def proxy_with_upstreams(tmp_path: Path) -> AsyncIterator[ProxyRuntime]:
    """Targets: ``repo`` (answers 200) and ``down`` (connection refused)."""

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hello)
    async with upstream_app(app) as url:
        path = write_config(
            tmp_path, upstreams={"repo": url, "down": closed_port_url()}, rules=RULES
        )
        async with running_proxy(path) as runtime:
            yield runtime


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def proxied(client: aiohttp.ClientSession, runtime: ProxyRuntime, path: str) -> str:
    """One request through the proxy; returns its request id."""
    async with client.get(runtime.main_url + path) as reply:
        await reply.read()
        return reply.headers["X-Sluice-Request-Id"]


# --------------------------------------------------------------------------- auth


@pytest.mark.asyncio
async def test_every_endpoint_requires_the_token_and_a_401_reveals_nothing(
    tmp_path: Path,
) -> None:
    async with proxy_with_upstreams(tmp_path) as runtime, client_session() as client:
        token = admin_token(runtime)
        token_file = runtime.state_dir / "admin.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(runtime.state_dir.stat().st_mode) & 0o077 == 0
        assert len(token) >= 32

        wrong_auth = [
            {},
            bearer("wrong-token"),
            bearer(token + "x"),
            bearer(token[:-1]),
            {"Authorization": "Bearer"},
            {"Authorization": "Bearer "},
            {"Authorization": token},
            {"Authorization": f"Token {token}"},
            {"Authorization": "Basic " + base64.b64encode(f"admin:{token}".encode()).decode()},
            {"Authorization": "Basic " + base64.b64encode(f"{token}:".encode()).decode()},
            {"X-Admin-Token": token},
        ]
        bodies = set()
        for endpoint in ENDPOINTS:
            for headers in wrong_auth:
                url = runtime.admin_url + endpoint
                async with client.get(url, headers=headers) as reply:
                    assert reply.status == 401, (endpoint, headers)
                    assert reply.headers["WWW-Authenticate"] == 'Bearer realm="sluice-admin"'
                    body = await reply.read()
                bodies.add(body)
                assert json.loads(body) == {
                    "error": "unauthorized",
                    "reason": "a valid admin token is required",
                }
                assert token.encode() not in body
                assert b"version" not in body
        assert len(bodies) == 1, "401 bodies differ between endpoints"

        async with client.get(runtime.admin_url + "/api/health", headers=bearer(token)) as reply:
            assert reply.status == 200
        async with client.get(
            runtime.admin_url + "/api/health", headers={"Authorization": f"bearer  {token} "}
        ) as reply:
            assert reply.status == 200  # the scheme is case-insensitive, spaces are trimmed


# --------------------------------------------------------------------------- health, flows


@pytest.mark.asyncio
async def test_health_reports_the_running_proxy(tmp_path: Path) -> None:
    async with proxy_with_upstreams(tmp_path) as runtime, client_session() as client:
        token = admin_token(runtime)
        async with client.get(runtime.admin_url + "/api/health", headers=bearer(token)) as reply:
            assert reply.status == 200
            health = await json_of(reply)
        assert health["status"] == "ok"
        assert isinstance(health["version"], str) and health["version"]
        assert health["uptime_s"] >= 0
        assert health["identity"] == "none"
        config = health["config"]
        assert config["path"] == str(tmp_path / "sluice.toml")
        assert config["digest"] == runtime.holder.current.digest
        assert config["reloads"] == 0
        assert config["last_error"] is None
        assert health["listen"] == runtime.main_url
        assert health["admin"] == runtime.admin_url
        assert health["in_flight"] == 0
        assert health["last_seq"] >= 1  # proxy.started
        assert health["flows"] == 0
        assert health["subscribers"] == 0
        assert health["dropped_subscribers"] == 0
        assert token not in json.dumps(health)


@pytest.mark.asyncio
async def test_flows_show_decision_rule_and_status(tmp_path: Path) -> None:
    async with proxy_with_upstreams(tmp_path) as runtime, client_session() as client:
        allowed = await proxied(client, runtime, "/repo/src/app.py")
        denied = await proxied(client, runtime, "/repo/.env")
        async with client.post(runtime.main_url + "/repo/x", data=b"x") as reply:
            default_denied = reply.headers["X-Sluice-Request-Id"]
        failed = await proxied(client, runtime, "/down/x")
        unknown = await proxied(client, runtime, "/nope/x")

        headers = bearer(admin_token(runtime))
        async with client.get(runtime.admin_url + "/api/flows", headers=headers) as reply:
            assert reply.status == 200
            flows = {flow["request_id"]: flow for flow in (await json_of(reply))["flows"]}
        assert list(flows) == [allowed, denied, default_denied, failed, unknown]

        expected = {
            allowed: ("allowed", "reads", 200, "completed"),
            denied: ("denied", "no-env", 403, "completed"),
            default_denied: ("denied", None, 403, "completed"),
            failed: ("allowed", "reads", 502, "failed"),
            unknown: ("refused", None, 404, "completed"),
        }
        for request_id, (decision, rule, status, state) in expected.items():
            flow = flows[request_id]
            assert flow["decision"] == decision, flow
            assert flow.get("rule") == rule, flow
            assert flow["status"] == status, flow
            assert flow["state"] == state, flow
            assert flow["method"] in ("GET", "POST")
            assert flow["duration_ms"] >= 0
        assert flows[allowed]["target"] == "repo"
        assert flows[allowed]["path"] == "/src/app.py"
        assert flows[denied]["reason"] == "credentials"
        assert flows[failed]["error"]

        async with client.get(
            runtime.admin_url + "/api/flows", params={"limit": "2"}, headers=headers
        ) as reply:
            recent = (await json_of(reply))["flows"]
        assert [flow["request_id"] for flow in recent] == [failed, unknown]
        async with client.get(
            runtime.admin_url + "/api/flows", params={"limit": "many"}, headers=headers
        ) as reply:
            assert reply.status == 400


# --------------------------------------------------------------------------- metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.mark.asyncio
async def test_metrics_are_prometheus_text_with_requests_latency_and_upstream_errors(
    tmp_path: Path,
) -> None:
    async with proxy_with_upstreams(tmp_path) as runtime, client_session() as client:
        for _ in range(2):
            await proxied(client, runtime, "/repo/a")
        await proxied(client, runtime, "/repo/.env")
        await proxied(client, runtime, "/down/x")

        headers = bearer(admin_token(runtime))
        async with client.get(runtime.admin_url + "/metrics", headers=headers) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await reply.text()
    assert 'sluice_requests_total{decision="allowed",status="200"} 2.0' in text
    assert "# TYPE sluice_request_duration_seconds histogram" in text
    values = samples(text)
    assert values[("sluice_requests_total", (("decision", "allowed"), ("status", "200")))] == 2
    assert values[("sluice_requests_total", (("decision", "denied"), ("status", "403")))] == 1
    assert values[("sluice_requests_total", (("decision", "allowed"), ("status", "502")))] == 1
    count = ("sluice_request_duration_seconds_count", (("decision", "allowed"),))
    assert values[count] == 3
    inf = ("sluice_request_duration_seconds_bucket", (("decision", "allowed"), ("le", "+Inf")))
    assert values[inf] == 3
    upstream = (
        "sluice_upstream_errors_total",
        (("kind", "upstream_unreachable"), ("target", "down")),
    )
    assert values[upstream] == 1


# --------------------------------------------------------------------------- event stream


@dataclass
class Sse:
    type: str
    data: dict[str, Any]
    id: int | None


async def next_sse(reply: aiohttp.ClientResponse, seconds: float = 5.0) -> Sse:
    """Read one server-sent event (comments and heartbeats skipped)."""
    fields: dict[str, str] = {}
    async with asyncio.timeout(seconds):
        while True:
            line = await reply.content.readline()
            if not line:
                raise EOFError("the event stream ended")
            text = line.decode().rstrip("\n")
            if not text:
                if fields:
                    seq = fields.get("id")
                    return Sse(
                        fields.get("event", "message"),
                        json.loads(fields.get("data", "null")),
                        int(seq) if seq else None,
                    )
                continue
            if text.startswith(":"):
                continue
            name, _, value = text.partition(":")
            fields[name] = value.removeprefix(" ")


async def sse_until(
    reply: aiohttp.ClientResponse, predicate: Any, seconds: float = 5.0
) -> list[Sse]:
    seen = []
    async with asyncio.timeout(seconds):
        while True:
            event = await next_sse(reply)
            seen.append(event)
            if predicate(event):
                return seen


LIFECYCLE = [
    "request.received",
    "request.decided",
    "request.forwarded",
    "request.response_started",
    "request.completed",
]


def for_request(events: list[Sse], request_id: str) -> list[Sse]:
    return [event for event in events if event.data.get("request_id") == request_id]


@pytest.mark.asyncio
async def test_event_stream_shows_a_request_lifecycle_and_replays_after_reconnect(
    tmp_path: Path,
) -> None:
    async with proxy_with_upstreams(tmp_path) as runtime, client_session() as client:
        headers = bearer(admin_token(runtime))
        events_url = runtime.admin_url + "/api/events"
        async with client.get(events_url, headers=headers) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"] == "text/event-stream"
            ready = await next_sse(stream)
            assert ready.type == "stream.ready"
            assert ready.data["last_seq"] == runtime.bus.last_seq

            first = await proxied(client, runtime, "/repo/one")
            seen = await sse_until(
                stream,
                lambda e: e.type == "request.completed" and e.data["request_id"] == first,
            )
        mine = for_request(seen, first)
        assert [event.type for event in mine] == LIFECYCLE
        seqs = [event.id for event in mine]
        assert all(isinstance(seq, int) for seq in seqs)
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert [event.data["seq"] for event in mine] == seqs
        assert mine[1].data["decision"] == "allowed"
        assert mine[1].data["rule"] == "reads"
        assert mine[-1].data["status"] == 200
        last_seen = seqs[-1]

        # while no one listens, another request happens
        second = await proxied(client, runtime, "/repo/two")
        async with client.get(
            events_url, params={"since": str(last_seen)}, headers=headers
        ) as stream:
            replayed = await sse_until(stream, lambda e: e.type == "stream.ready")
            assert replayed[-1].data["last_seq"] == runtime.bus.last_seq
            replay = replayed[:-1]
            assert [event.type for event in for_request(replay, second)] == LIFECYCLE
            assert all(event.id is not None and event.id > last_seen for event in replay)
            assert not for_request(replay, first)

            # and live events continue after the replay, without duplicates
            third = await proxied(client, runtime, "/repo/.env")
            live = await sse_until(
                stream,
                lambda e: e.type == "request.completed" and e.data["request_id"] == third,
            )
        third_events = for_request(live, third)
        assert [event.type for event in third_events] == [
            "request.received",
            "request.decided",
            "request.completed",
        ]
        assert third_events[1].data["decision"] == "denied"
        ids = [event.id for event in replay + live if event.id is not None]
        assert ids == sorted(set(ids))

        # Last-Event-ID works like ?since=
        async with client.get(
            events_url, headers={**headers, "Last-Event-ID": str(third_events[0].id)}
        ) as stream:
            replayed = await sse_until(stream, lambda e: e.type == "stream.ready")
        assert [event.type for event in replayed[:-1]] == [
            "request.decided",
            "request.completed",
        ]
        async with client.get(events_url, params={"since": "x"}, headers=headers) as reply:
            assert reply.status == 400


def small_admin_app(bus: EventBus, tmp_path: Path) -> tuple[web.Application, str]:
    config_path = write_config(tmp_path, upstreams={"repo": closed_port_url()})
    token = "t" * 40
    admin = AdminApi(
        token=token,
        holder=ConfigHolder(load_config(config_path)),
        bus=bus,
        flows=FlowTable(),
        metrics=ProxyMetrics(),
        status=lambda: {},
    )
    return admin.make_app(), token


@pytest.mark.asyncio
async def test_a_slow_subscriber_is_dropped_and_never_blocks_publishing(tmp_path: Path) -> None:
    bus = EventBus(capacity=1000, subscriber_queue=4)
    stalled = bus.subscribe()  # never reads
    healthy = bus.subscribe()
    started = time.perf_counter()
    for index in range(50_000):
        bus.publish("test.tick", index=index)
        if index < 3:
            await healthy.queue.get()
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"publishing took {elapsed:.1f}s"
    assert stalled.dropped and healthy.dropped  # healthy stopped reading after 3
    assert bus.dropped_subscribers == 2
    assert bus.subscriber_count == 0
    drained = [event.data["index"] async for event in stalled]
    assert drained == [0, 1, 2, 3]  # what fit in its queue, then the iteration ends
    assert bus.last_seq == 50_000
    replay, gap = bus.since(0)
    assert gap and len(replay) == 1000  # the ring still serves a reconnect

    # Over a real socket: the SSE client gets what was queued, then stream.dropped.
    bus = EventBus(capacity=1000, subscriber_queue=4)
    app, token = small_admin_app(bus, tmp_path)
    async with upstream_app(app) as url, client_session() as client:
        async with client.get(f"{url}/api/events", headers=bearer(token)) as stream:
            assert (await next_sse(stream)).type == "stream.ready"
            assert bus.subscriber_count == 1
            for index in range(100):  # no await: the pump cannot keep up
                bus.publish("test.tick", index=index)
            events = []
            with contextlib.suppress(EOFError):
                while True:
                    events.append(await next_sse(stream))
        assert events[-1].type == "stream.dropped"
        ticks = [event.data["index"] for event in events if event.type == "test.tick"]
        assert ticks == list(range(len(ticks))) and len(ticks) <= 4
        assert events[-1].data["last_seq"] == (ticks[-1] + 1 if ticks else 0)
        assert bus.dropped_subscribers == 1
        assert bus.subscriber_count == 0


@contextlib.asynccontextmanager
async def one_request_in_flight(tmp_path: Path) -> AsyncIterator[ProxyRuntime]:
    """A proxy with one request held inside the upstream for the duration of the block."""
    entered = asyncio.Event()
    release = asyncio.Event()

    async def held(_request: web.Request) -> web.Response:
        entered.set()
        await asyncio.wait_for(release.wait(), 10)
        return web.Response(text="released")

    app = web.Application()
    app.router.add_get("/{tail:.*}", held)
    async with upstream_app(app) as url:
        path = write_config(tmp_path, upstreams={"repo": url}, rules=RULES)
        async with running_proxy(path) as runtime, client_session() as client:

            async def request() -> int:
                async with client.get(f"{runtime.main_url}/repo/held") as reply:
                    await reply.read()
                    return reply.status

            task = asyncio.create_task(request())
            try:
                await asyncio.wait_for(entered.wait(), 5)
                yield runtime
            finally:
                release.set()
                assert await asyncio.wait_for(task, 5) == 200


@pytest.mark.asyncio
async def test_health_counts_requests_in_flight(tmp_path: Path) -> None:
    async with one_request_in_flight(tmp_path) as runtime, client_session() as client:
        headers = bearer(admin_token(runtime))
        async with client.get(runtime.admin_url + "/api/health", headers=headers) as reply:
            assert (await json_of(reply))["in_flight"] == 1
        async with client.get(runtime.admin_url + "/api/flows", headers=headers) as reply:
            (flow,) = (await json_of(reply))["flows"]
        assert flow["state"] == "forwarded"
        assert "status" not in flow


@pytest.mark.asyncio
async def test_metrics_gauge_counts_requests_in_flight(tmp_path: Path) -> None:
    async with one_request_in_flight(tmp_path) as runtime, client_session() as client:
        headers = bearer(admin_token(runtime))
        async with client.get(runtime.admin_url + "/metrics", headers=headers) as reply:
            values = samples(await reply.text())
    assert values[("sluice_requests_in_flight", ())] == 1


@pytest.mark.asyncio
async def test_event_stream_with_a_cursor_from_before_a_restart_reports_a_gap_and_delivers(
    tmp_path: Path,
) -> None:
    async with proxy_with_upstreams(tmp_path) as runtime, client_session() as client:
        stale = runtime.bus.last_seq + 1000  # what a console saw from the previous process
        async with client.get(
            runtime.admin_url + "/api/events",
            params={"since": str(stale)},
            headers=bearer(admin_token(runtime)),
        ) as stream:
            head = await sse_until(stream, lambda e: e.type == "stream.ready")
            assert head[0].type == "stream.gap"
            assert "proxy.started" in [event.type for event in head]
            request_id = await proxied(client, runtime, "/repo/a")
            seen = await sse_until(
                stream,
                lambda e: e.type == "request.completed" and e.data["request_id"] == request_id,
            )
    assert [event.type for event in for_request(seen, request_id)] == LIFECYCLE
