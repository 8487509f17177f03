"""Event bus, flow table, header hygiene, the state directory and config reload."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.events import Event, EventBus
from proxy.filter_language import parse_filter
from proxy.flows import FlowTable, flow_facts
from proxy.headers import (
    connection_tokens,
    forwarded_headers,
    request_headers_for_upstream,
    response_headers_for_agent,
)
from proxy.reload import ConfigHolder
from proxy.state import (
    ADMIN_TOKEN_FILE,
    StateError,
    ensure_state_dir,
    load_or_create_admin_token,
    tokens_equal,
)

# --- event bus ---------------------------------------------------------------------------


def test_seq_is_monotonic_from_one() -> None:
    bus = EventBus(capacity=100)
    events = [bus.publish("tick", n=n) for n in range(50)]
    assert [event.seq for event in events] == list(range(1, 51))
    assert bus.last_seq == 50
    assert all(a.ts <= b.ts for a, b in itertools.pairwise(events))


def test_event_to_json_flattens_data() -> None:
    event = EventBus().publish("request.received", request_id="r1", method="GET")
    assert event.to_json() == {
        "seq": 1,
        "ts": event.ts,
        "type": "request.received",
        "request_id": "r1",
        "method": "GET",
    }


def test_ring_keeps_the_latest_capacity_events() -> None:
    bus = EventBus(capacity=5)
    for n in range(12):
        bus.publish("tick", n=n)
    events, gap = bus.since(0)
    assert [event.seq for event in events] == [8, 9, 10, 11, 12]
    assert gap


@pytest.mark.parametrize(
    ("since", "seqs", "gap"),
    [
        (0, [6, 7, 8, 9, 10], True),
        (4, [6, 7, 8, 9, 10], True),  # 5 was forgotten
        (5, [6, 7, 8, 9, 10], False),  # nothing missing between 5 and 6
        (7, [8, 9, 10], False),
        (10, [], False),
    ],
)
def test_since_replays_and_detects_gaps(since: int, seqs: list[int], gap: bool) -> None:
    bus = EventBus(capacity=5)
    for n in range(10):
        bus.publish("tick", n=n)
    events, missed = bus.since(since)
    assert [event.seq for event in events] == seqs
    assert missed is gap


def test_since_on_an_empty_bus() -> None:
    assert EventBus().since(0) == ([], False)


def test_since_a_seq_from_a_previous_run_is_a_gap() -> None:
    """A console resuming after a proxy restart: everything this run holds is new to it."""
    bus = EventBus(capacity=5)
    for _ in range(3):
        bus.publish("tick")
    events, gap = bus.since(5000)
    assert [event.seq for event in events] == [1, 2, 3]
    assert gap, "the caller must learn that its position is unknown to this bus"


def test_listeners_see_every_event_in_order() -> None:
    bus = EventBus()
    seen: list[int] = []
    bus.add_listener(lambda event: seen.append(event.seq))
    for _ in range(3):
        bus.publish("tick")
    assert seen == [1, 2, 3]


def test_subscriber_receives_published_events() -> None:
    async def scenario() -> list[int]:
        bus = EventBus()
        subscription = bus.subscribe()
        assert bus.subscriber_count == 1
        for _ in range(3):
            bus.publish("tick")
        got = [subscription.queue.get_nowait().seq for _ in range(3)]
        subscription.close()
        assert bus.subscriber_count == 0
        bus.publish("tick")
        assert subscription.queue.empty()
        return got

    assert asyncio.run(scenario()) == [1, 2, 3]


def test_slow_subscriber_is_dropped_without_blocking_publish() -> None:
    async def scenario() -> None:
        bus = EventBus(capacity=100, subscriber_queue=3)
        slow = bus.subscribe()
        fast = bus.subscribe()
        for _ in range(3):
            bus.publish("tick")
        for _ in range(3):
            fast.queue.get_nowait()
        assert not slow.dropped
        # The 4th event overflows the slow queue: publish returns at once, slow is dropped.
        event = bus.publish("tick")  # synchronous: it cannot wait on a consumer
        assert event.seq == 4
        assert slow.dropped
        assert not fast.dropped
        assert bus.dropped_subscribers == 1
        assert bus.subscriber_count == 1
        for _ in range(10):
            bus.publish("tick")
        assert slow.queue.qsize() == 3  # nothing more is queued for a dropped subscriber
        # Its stream yields what it held and then ends, so the consumer can resume with since.
        drained = [item.seq async for item in slow]
        assert drained == [1, 2, 3]
        replay, gap = bus.since(drained[-1])
        assert [item.seq for item in replay] == list(range(4, 15))
        assert not gap

    asyncio.run(asyncio.wait_for(scenario(), timeout=5))


# --- flow table --------------------------------------------------------------------------


def lifecycle(bus: EventBus, request_id: str, *, status: int = 200) -> None:
    bus.publish(
        "request.received",
        request_id=request_id,
        method="POST",
        target="repo",
        path="/api/push",
        query="force=1",
        host="127.0.0.1:8700",
        client="127.0.0.1",
        session="s1",
    )
    bus.publish(
        "request.decided",
        request_id=request_id,
        decision="allowed",
        rule="push-agent-branches",
        reason="ok",
        code="allowed",
    )
    bus.publish("request.forwarded", request_id=request_id, upstream="repo")
    bus.publish("request.response_started", request_id=request_id, status=status, upstream_ms=3.5)
    bus.publish(
        "request.completed",
        request_id=request_id,
        status=status,
        bytes_in=10,
        bytes_out=20,
        duration_ms=7.0,
    )


def test_flow_table_folds_the_lifecycle() -> None:
    bus = EventBus()
    table = FlowTable()
    states: list[str] = []

    def listen(event: Event) -> None:
        flow = table.apply(event)
        if flow is not None:
            states.append(flow["state"])

    bus.add_listener(listen)
    lifecycle(bus, "r1", status=201)
    assert states == ["received", "decided", "forwarded", "response_started", "completed"]
    flow = table.get("r1")
    assert flow is not None
    assert flow["request_id"] == "r1"
    assert flow["state"] == "completed"
    assert flow["seq"] == 5
    assert flow["method"] == "POST" and flow["path"] == "/api/push"
    assert flow["decision"] == "allowed" and flow["rule"] == "push-agent-branches"
    assert flow["status"] == 201
    assert (flow["bytes_in"], flow["bytes_out"], flow["duration_ms"]) == (10, 20, 7.0)
    assert flow["upstream_ms"] == 3.5
    assert flow["upstream"] == "repo"  # every field an event carries is folded in
    assert isinstance(flow["started"], float)
    assert len(table) == 1


def test_flow_table_ignores_non_flow_events() -> None:
    table = FlowTable()
    bus = EventBus()
    assert table.apply(bus.publish("config.reloaded", digest="x")) is None
    assert table.apply(bus.publish("request.received")) is None  # no request_id
    assert table.apply(bus.publish("admin.login", request_id="r1")) is None
    assert len(table) == 0


def test_flow_table_returns_copies() -> None:
    table = FlowTable()
    table.apply(EventBus().publish("request.received", request_id="r1", path="/a"))
    copy = table.get("r1")
    assert copy is not None
    copy["path"] = "/changed"
    assert table.get("r1")["path"] == "/a"  # type: ignore[index]
    assert table.get("missing") is None


def test_flow_table_evicts_the_oldest() -> None:
    bus = EventBus()
    table = FlowTable(capacity=3)
    bus.add_listener(table.apply)
    for n in range(5):
        bus.publish("request.received", request_id=f"r{n}", path=f"/{n}")
    # Updating an old flow does not bring back an evicted one.
    bus.publish("request.completed", request_id="r4", status=200)
    assert len(table) == 3
    assert table.get("r0") is None and table.get("r1") is None
    assert [flow["request_id"] for flow in table.recent()] == ["r2", "r3", "r4"]
    assert [flow["request_id"] for flow in table.recent(2)] == ["r3", "r4"]
    assert table.recent(0) == []


def test_flow_facts_work_with_filters() -> None:
    bus = EventBus()
    table = FlowTable()
    bus.add_listener(table.apply)
    lifecycle(bus, "ok", status=200)
    lifecycle(bus, "bad", status=502)
    bus.publish("request.received", request_id="denied", method="GET", target="build", path="/.env")
    bus.publish("request.decided", request_id="denied", decision="denied", rule="creds")
    bus.publish("request.completed", request_id="denied", status=403)

    def select(text: str) -> list[str]:
        matcher = parse_filter(text)
        return [flow["request_id"] for flow in table.recent() if matcher.matches(flow_facts(flow))]

    assert select("status:>=400") == ["bad", "denied"]
    assert select("!decision:allowed") == ["denied"]
    assert select("method:POST status:5xx") == ["bad"]
    assert select("target:repo path:/api/**") == ["ok", "bad"]
    assert select("rule:push-* query.force:1") == ["ok", "bad"]
    assert select("host:127.0.0.1") == ["ok", "bad"]
    assert select(".env") == ["denied"]


def test_flow_facts_defaults_for_a_sparse_flow() -> None:
    facts = flow_facts({"request_id": "r"})
    assert (facts.method, facts.path, facts.target, facts.status) == ("", "/", None, None)


# --- headers -----------------------------------------------------------------------------


def names(pairs: list[tuple[str, str]]) -> list[str]:
    return [name for name, _ in pairs]


def test_request_headers_for_upstream() -> None:
    given = [
        ("Host", "127.0.0.1:8700"),
        ("Content-Length", "12"),
        ("Connection", "keep-alive, X-Secret-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "websocket"),
        ("Proxy-Authorization", "Basic eA=="),
        ("Proxy-Authenticate", "Basic"),
        ("X-Secret-Hop", "drop me"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("x-forwarded-host", "evil"),
        ("X-Forwarded-Proto", "https"),
        ("X-Sluice-Subject", "admin"),
        ("X-Sluice-Request-Id", "forged"),
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("Accept", "application/json"),
        ("Authorization", "Bearer agent-token-for-sluice"),
        ("X-Custom", "a"),
        ("x-custom", "b"),
        ("Content-Type", "application/json"),
    ]
    assert request_headers_for_upstream(given) == [
        ("Accept", "application/json"),
        ("X-Custom", "a"),
        ("x-custom", "b"),
        ("Content-Type", "application/json"),
    ]


def test_request_headers_also_drop_what_sluice_injects() -> None:
    given = [("X-Api-Key", "agent-supplied"), ("x-api-key", "again"), ("Accept", "*/*")]
    assert request_headers_for_upstream(given, also_drop=["X-API-Key"]) == [("Accept", "*/*")]
    assert names(request_headers_for_upstream(given)) == ["X-Api-Key", "x-api-key", "Accept"]


def test_connection_tokens_across_several_connection_headers() -> None:
    pairs = [("Connection", "close"), ("connection", " X-A ,, x-b "), ("X-A", "1"), ("X-C", "2")]
    assert connection_tokens(pairs) == frozenset({"close", "x-a", "x-b"})
    assert names(request_headers_for_upstream(iter(pairs))) == ["X-C"]


def test_response_headers_for_agent() -> None:
    given = [
        ("Content-Length", "5"),
        ("Connection", "close, X-Upstream-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Upgrade", "h2c"),
        ("X-Upstream-Hop", "1"),
        ("X-Sluice-Decision", "allowed"),
        ("x-sluice-rule", "forged"),
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Forwarded-For", "kept on responses"),
    ]
    assert response_headers_for_agent(given) == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Forwarded-For", "kept on responses"),
    ]


def test_forwarded_headers_survive_a_second_pass_only_as_sluice_sets_them() -> None:
    ours = forwarded_headers(client_ip="127.0.0.1", host="h", scheme="http", request_id="r1")
    assert names(ours) == [
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Sluice-Request-Id",
    ]
    # What an agent sends under these names never reaches the upstream.
    assert request_headers_for_upstream(ours) == []


# --- state directory ---------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_admin_token_created_private_and_stable(tmp_path: Path) -> None:
    state = tmp_path / "nested" / "state"
    token = load_or_create_admin_token(state)
    assert len(token) >= 32
    assert mode(state) == 0o700
    token_file = state / ADMIN_TOKEN_FILE
    assert mode(token_file) == 0o600
    assert token_file.read_text().strip() == token
    assert load_or_create_admin_token(state) == token
    assert tokens_equal(token, load_or_create_admin_token(state))
    assert not tokens_equal(token, token + "x")


def test_distinct_state_dirs_get_distinct_tokens(tmp_path: Path) -> None:
    assert load_or_create_admin_token(tmp_path / "a") != load_or_create_admin_token(tmp_path / "b")


@pytest.mark.parametrize("loose", [0o640, 0o604, 0o644, 0o660])
def test_readable_token_file_is_refused(tmp_path: Path, loose: int) -> None:
    state = tmp_path / "state"
    load_or_create_admin_token(state)
    os.chmod(state / ADMIN_TOKEN_FILE, loose)
    with pytest.raises(StateError, match="readable by others"):
        load_or_create_admin_token(state)


def test_short_token_is_refused(tmp_path: Path) -> None:
    state = ensure_state_dir(tmp_path / "state")
    token_file = state / ADMIN_TOKEN_FILE
    token_file.write_text("short\n")
    os.chmod(token_file, 0o600)
    with pytest.raises(StateError, match="no usable token"):
        load_or_create_admin_token(state)


def test_symlinked_state_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with pytest.raises(StateError, match="symlink"):
        load_or_create_admin_token(link)
    assert not (real / ADMIN_TOKEN_FILE).exists()


def test_state_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "state"
    blocker.write_text("")
    with pytest.raises((StateError, FileExistsError)):
        ensure_state_dir(blocker)


def test_group_writable_state_dir_is_tightened(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    ensure_state_dir(state)
    assert mode(state) == 0o700


def test_symlinked_token_file_is_not_followed(tmp_path: Path) -> None:
    state = ensure_state_dir(tmp_path / "state")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("x" * 40)
    os.chmod(elsewhere, 0o600)
    (state / ADMIN_TOKEN_FILE).symlink_to(elsewhere)
    with pytest.raises(StateError, match="symlink"):
        load_or_create_admin_token(state)


# --- config reload -----------------------------------------------------------------------

GOOD = """
[[targets]]
name = "repo"
upstream = "http://127.0.0.1:9000"

[[rules]]
name = "read"
target = "repo"
method = "GET"
action = "allow"
"""


def holder_for(tmp_path: Path) -> tuple[ConfigHolder, Path]:
    path = tmp_path / "sluice.toml"
    path.write_text(GOOD, encoding="utf-8")
    return ConfigHolder(load_config(path)), path


def test_reload_keeps_the_old_config_on_a_broken_file(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)
    running = holder.current
    bus = EventBus()
    path.write_text(GOOD + 'bogus = "x"\n', encoding="utf-8")
    assert holder.reload(bus) is False
    assert holder.current is running
    assert holder.last_error is not None
    assert f"{path}:" in holder.last_error and "bogus" in holder.last_error
    assert holder.reloads == 0
    events, _ = bus.since(0)
    assert [event.type for event in events] == ["config.reload_failed"]
    assert events[0].data["running"] == running.digest


def test_reload_keeps_the_old_config_on_invalid_toml(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)
    running = holder.current
    path.write_text("[[rules]\n", encoding="utf-8")
    assert holder.reload() is False
    assert holder.current is running
    assert "invalid TOML" in (holder.last_error or "")


def test_reload_keeps_the_old_config_when_the_file_is_deleted(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)
    running = holder.current
    path.unlink()
    assert holder.reload() is False
    assert holder.current is running
    assert "cannot read config" in (holder.last_error or "")


def test_reload_swaps_in_a_good_config(tmp_path: Path) -> None:
    holder, path = holder_for(tmp_path)
    old = holder.current
    bus = EventBus()
    path.write_text(GOOD + 'bogus = "x"\n', encoding="utf-8")
    holder.reload(bus)
    path.write_text(
        GOOD.replace('method = "GET"', 'method = ["GET", "HEAD"]')
        + '\n[proxy]\nlisten = "127.0.0.1:8799"\n',
        encoding="utf-8",
    )
    assert holder.reload(bus) is True
    assert holder.current is not old
    assert holder.current.digest != old.digest
    assert holder.current.proxy.listen == "127.0.0.1:8799"
    assert holder.last_error is None
    assert holder.reloads == 1
    events, _ = bus.since(0)
    assert [event.type for event in events] == ["config.reload_failed", "config.reloaded"]
    assert events[-1].data["digest"] == holder.current.digest
    assert events[-1].data["rules"] == 1
    assert events[-1].data["needs_restart"] == ["proxy.listen"]
    assert old.proxy.listen == "127.0.0.1:8700"  # the old object is untouched


def test_reload_of_an_unchanged_file_is_a_no_op(tmp_path: Path) -> None:
    holder, _ = holder_for(tmp_path)
    running = holder.current
    bus = EventBus()
    assert holder.reload(bus) is True
    assert holder.current is running
    assert holder.reloads == 0
    assert bus.last_seq == 0
