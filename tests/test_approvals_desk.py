"""The approval desk and the learned-rules file, without sockets.

``ApprovalDesk`` is plain asyncio: these tests hold requests, decide them, let them expire
or be withdrawn, and check every rule of the desk (first decision wins, no self-approval,
scopes, late approvals) with a controllable clock. ``proxy.learned`` is checked for glob
escaping and for how it writes the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals import (
    ApprovalDesk,
    ApprovalError,
    Held,
    QueueFull,
    Scope,
    State,
    fingerprint,
)
from proxy.learned import HEADER, append_rule, rule_for
from proxy.matcher import Facts
from proxy.policy import Action, Policy

# --------------------------------------------------------------------------- plumbing


class Clock:
    """A clock the test moves by hand; ``wait`` turns ``deadline - now`` into real seconds."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Desk:
    """An ApprovalDesk with a hand clock and a list of what it emitted."""

    def __init__(self, *, max_pending: int = 10, retry_window: float = 60.0) -> None:
        self.clock = Clock()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.learned: list[tuple[str, str, str]] = []
        self.desk = ApprovalDesk(
            max_pending=max_pending,
            retry_window=retry_window,
            emit=lambda kind, summary: self.events.append((kind, summary)),
            learn=self._learn,
            clock=self.clock,
        )

    def _learn(self, held: Held, verdict: str, approver: str) -> str:
        self.learned.append((held.id, verdict, approver))
        return f"learned-{held.id}"

    def hold(
        self,
        *,
        session: str = "alice/s1",
        subject: str = "alice",
        rule: str | None = "deploys",
        body: bytes = b'{"env":"prod"}',
        path: str = "/v1/deploy",
        query: str = "",
        method: str = "POST",
        target: str = "api",
        ttl: float = 30.0,
        session_expires: float | None = None,
    ) -> Held:
        return self.desk.hold(
            request_id=f"req-{len(self.events)}",
            session=session,
            subject=subject,
            method=method,
            target=target,
            path=path,
            query=query,
            rule=rule,
            reason="deploys need a person",
            preview=body.decode(),
            body_sha256=hashlib.sha256(body).hexdigest(),
            fingerprint=fingerprint(method, target, path, query, body),
            deadline=self.clock.now + ttl,
            session_expires=session_expires,
        )

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def fp(
    method: str = "POST",
    target: str = "api",
    path: str = "/v1/deploy",
    query: str = "",
    body: bytes = b"{}",
) -> str:
    return fingerprint(method, target, path, query, body)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# --------------------------------------------------------------------------- hold, decide, wait


@pytest.mark.asyncio
async def test_hold_then_approve_wakes_the_waiter() -> None:
    d = Desk()
    held = d.hold()
    assert held.state is State.PENDING
    assert [s["id"] for s in d.desk.pending()] == [held.id]
    waiter = asyncio.create_task(d.desk.wait(held, None))
    await settle()
    assert not waiter.done()
    summary = d.desk.decide(held.id, "approve", "once", "looks fine", "bob")
    assert await asyncio.wait_for(waiter, 2) is State.APPROVED
    assert summary["state"] == "approved"
    assert summary["decided_by"] == "bob"
    assert summary["decision_reason"] == "looks fine"
    assert summary["scope"] == "once"
    assert summary["decided_at"] == d.clock.now
    assert d.desk.pending() == []
    assert d.desk.get(held.id) is held  # kept for 409s
    assert d.kinds() == ["approval.requested", "approval.decided"]
    assert d.events[0][1]["state"] == "pending"
    assert d.events[1][1] == summary


@pytest.mark.asyncio
async def test_hold_then_deny_wakes_the_waiter_with_the_reason() -> None:
    d = Desk()
    held = d.hold()
    waiter = asyncio.create_task(d.desk.wait(held, None))
    await settle()
    summary = d.desk.decide(held.id, "deny", "once", "not on a Friday", "bob")
    assert await asyncio.wait_for(waiter, 2) is State.DENIED
    assert summary["state"] == "denied"
    assert held.decided_by == "bob"
    assert held.decision_reason == "not on a Friday"


@pytest.mark.asyncio
async def test_decision_before_wait_is_not_lost() -> None:
    d = Desk()
    held = d.hold()
    d.desk.decide(held.id, "approve", "once", "", "bob")
    assert await asyncio.wait_for(d.desk.wait(held, None), 2) is State.APPROVED


@pytest.mark.asyncio
async def test_summary_carries_what_an_approver_needs() -> None:
    d = Desk()
    held = d.hold(body=b"hello", query="dry=1", session_expires=123.0)
    summary = held.summary()
    assert summary["id"].startswith("ap-")
    assert summary["method"] == "POST"
    assert summary["target"] == "api"
    assert summary["path"] == "/v1/deploy"
    assert summary["query"] == "dry=1"
    assert summary["subject"] == "alice"
    assert summary["session"] == "alice/s1"
    assert summary["rule"] == "deploys"
    assert summary["preview"] == "hello"
    assert summary["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert summary["deadline"] == d.clock.now + 30
    assert summary["state"] == "pending"
    assert "fingerprint" not in summary and "future" not in summary
    assert len({d.hold().id for _ in range(5)} | {held.id}) == 6  # ids are unique


@pytest.mark.asyncio
async def test_first_decision_wins_the_second_gets_409_with_the_current_summary() -> None:
    d = Desk()
    held = d.hold()
    first = d.desk.decide(held.id, "approve", "once", "ok", "bob")
    for decision in ("approve", "deny"):
        with pytest.raises(ApprovalError) as caught:
            d.desk.decide(held.id, decision, "once", "too late", "carol")
        error = caught.value
        assert error.status == 409
        assert error.error == "already_decided"
        assert error.current == first
        assert error.current["decided_by"] == "bob"
    assert held.state is State.APPROVED
    assert held.decided_by == "bob" and held.decision_reason == "ok"
    assert d.kinds().count("approval.decided") == 1


@pytest.mark.asyncio
async def test_self_approval_is_refused_403_and_changes_nothing() -> None:
    d = Desk()
    held = d.hold(subject="alice")
    for decision in ("approve", "deny"):
        with pytest.raises(ApprovalError) as caught:
            d.desk.decide(held.id, decision, "once", "", "alice")
        assert caught.value.status == 403
        assert caught.value.error == "self_approval"
    assert held.state is State.PENDING
    assert d.desk.decide(held.id, "approve", "once", "", "bob")["state"] == "approved"


@pytest.mark.asyncio
async def test_unknown_id_is_404() -> None:
    d = Desk()
    d.hold()
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide("ap-nope-1", "approve", "once", "", "bob")
    assert (caught.value.status, caught.value.error) == (404, "not_found")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("decision", "scope"),
    [("yes", "once"), ("", "once"), ("APPROVE", "once"), ("approve", "forever"), ("deny", "")],
)
async def test_bad_decision_or_scope_is_400(decision: str, scope: str) -> None:
    d = Desk()
    held = d.hold()
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide(held.id, decision, scope, "", "bob")
    assert (caught.value.status, caught.value.error) == (400, "bad_request")
    assert held.state is State.PENDING


@pytest.mark.asyncio
async def test_bad_input_is_checked_before_the_id() -> None:
    d = Desk()
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide("ap-nope-1", "maybe", "once", "", "bob")
    assert caught.value.status == 400


@pytest.mark.asyncio
async def test_no_decision_before_the_deadline_expires() -> None:
    d = Desk()
    held = d.hold(ttl=0.05)  # 50 ms of real waiting
    state = await asyncio.wait_for(d.desk.wait(held, None), 2)
    assert state is State.EXPIRED
    assert held.state is State.EXPIRED
    assert held.decided_by is None
    assert d.desk.pending() == []
    assert d.kinds() == ["approval.requested", "approval.expired"]
    assert d.events[-1][1]["state"] == "expired"


@pytest.mark.asyncio
async def test_a_deadline_already_past_expires_at_once() -> None:
    d = Desk()
    held = d.hold(ttl=-1)
    state = await asyncio.wait_for(d.desk.wait(held, None), 0.5)
    assert state is State.EXPIRED


@pytest.mark.asyncio
async def test_agent_hanging_up_withdraws_and_gone_is_not_cancelled() -> None:
    d = Desk()
    held = d.hold()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter = asyncio.create_task(d.desk.wait(held, gone))
    await settle()
    assert not waiter.done()
    gone.set_result(None)
    assert await asyncio.wait_for(waiter, 2) is State.WITHDRAWN
    assert held.state is State.WITHDRAWN
    assert d.kinds() == ["approval.requested", "approval.withdrawn"]
    assert d.desk.pending() == []
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide(held.id, "approve", "once", "", "bob")
    assert caught.value.status == 409
    assert caught.value.current is not None
    assert caught.value.current["state"] == "withdrawn"


@pytest.mark.asyncio
async def test_wait_never_cancels_the_connection_future() -> None:
    """``gone`` belongs to the connection: approval or expiry leave it pending."""
    d = Desk()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    approved = d.hold()
    waiter = asyncio.create_task(d.desk.wait(approved, gone))
    await settle()
    d.desk.decide(approved.id, "approve", "once", "", "bob")
    assert await asyncio.wait_for(waiter, 2) is State.APPROVED
    assert not gone.done()
    expired = d.hold(ttl=0.02)
    assert await asyncio.wait_for(d.desk.wait(expired, gone), 2) is State.EXPIRED
    assert not gone.done() and not gone.cancelled()
    # the same connection can hold again, and hanging up then still withdraws
    third = d.hold()
    waiter = asyncio.create_task(d.desk.wait(third, gone))
    await settle()
    gone.set_result(None)
    assert await asyncio.wait_for(waiter, 2) is State.WITHDRAWN


@pytest.mark.asyncio
async def test_a_decision_wins_over_a_hangup_seen_at_the_same_time() -> None:
    d = Desk()
    held = d.hold()
    gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    gone.set_result(None)
    d.desk.decide(held.id, "deny", "once", "no", "bob")
    assert await d.desk.wait(held, gone) is State.DENIED


# --------------------------------------------------------------------------- scopes


@pytest.mark.asyncio
async def test_session_scope_covers_the_same_rule_in_the_same_session_only() -> None:
    d = Desk()
    held = d.hold(session="alice/s1", rule="deploys")
    d.desk.decide(held.id, "approve", "session", "", "bob")
    other_body = fp(body=b"something else entirely")
    grant = d.desk.standing_verdict(other_body, "alice/s1", "deploys")
    assert grant is not None
    assert (grant.verdict, grant.by) == ("allow", "bob")
    # it is not used up
    assert d.desk.standing_verdict(fp(), "alice/s1", "deploys") is not None
    assert d.desk.standing_verdict(fp(), "alice/s2", "deploys") is None  # another session
    assert d.desk.standing_verdict(fp(), "alice/s1", "migrations") is None  # another rule
    assert d.desk.standing_verdict(fp(), "mallory/s1", "deploys") is None


@pytest.mark.asyncio
async def test_session_scope_deny_is_a_standing_denial() -> None:
    d = Desk()
    held = d.hold()
    d.desk.decide(held.id, "deny", "session", "stop it", "bob")
    grant = d.desk.standing_verdict(fp(), "alice/s1", "deploys")
    assert grant is not None and grant.verdict == "deny"


@pytest.mark.asyncio
async def test_session_scope_ends_with_the_session() -> None:
    d = Desk()
    held = d.hold(session_expires=d.clock.now + 100)
    d.desk.decide(held.id, "approve", "session", "", "bob")
    d.clock.now += 99
    assert d.desk.standing_verdict(fp(), "alice/s1", "deploys") is not None
    d.clock.now += 2
    assert d.desk.standing_verdict(fp(), "alice/s1", "deploys") is None


@pytest.mark.asyncio
async def test_once_scope_leaves_nothing_standing() -> None:
    d = Desk()
    held = d.hold()
    d.desk.decide(held.id, "approve", "once", "", "bob")
    assert d.desk.standing_verdict(held.fingerprint, "alice/s1", "deploys") is None
    assert d.learned == []


@pytest.mark.asyncio
async def test_always_scope_calls_learn_and_records_the_rule() -> None:
    d = Desk()
    held = d.hold()
    summary = d.desk.decide(held.id, "deny", "always", "never", "bob")
    assert d.learned == [(held.id, "deny", "bob")]
    assert summary["learned_rule"] == f"learned-{held.id}"
    assert summary["scope"] == "always"
    assert summary["state"] == "denied"


# --------------------------------------------------------------------------- late approvals


async def _expire(d: Desk, **kwargs: Any) -> Held:
    held = d.hold(ttl=0, **kwargs)
    assert await asyncio.wait_for(d.desk.wait(held, None), 1) is State.EXPIRED
    return held


@pytest.mark.asyncio
async def test_late_approval_grants_one_retry_of_the_identical_request() -> None:
    d = Desk(retry_window=60)
    held = await _expire(d)
    d.clock.now += 30
    summary = d.desk.decide(held.id, "approve", "once", "sorry, was at lunch", "bob")
    assert summary["state"] == "approved"
    assert summary["decided_by"] == "bob"
    assert d.kinds()[-1] == "approval.decided"
    assert d.desk.pending() == []
    # another body, query, path, method or target gets nothing
    for changed in (
        fp(body=b'{"env":"dev"}'),
        fingerprint("POST", "api", "/v1/deploy", "x=1", b'{"env":"prod"}'),
        fingerprint("POST", "api", "/v1/deploy2", "", b'{"env":"prod"}'),
        fingerprint("PUT", "api", "/v1/deploy", "", b'{"env":"prod"}'),
        fingerprint("POST", "api2", "/v1/deploy", "", b'{"env":"prod"}'),
    ):
        assert d.desk.standing_verdict(changed, "other/s", "other-rule") is None
    grant = d.desk.standing_verdict(held.fingerprint, "alice/s1", "deploys")
    assert grant is not None and (grant.verdict, grant.by) == ("allow", "bob")
    # once only
    assert d.desk.standing_verdict(held.fingerprint, "alice/s1", "deploys") is None
    # and the approval itself is closed now
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide(held.id, "approve", "once", "", "carol")
    assert caught.value.status == 409


@pytest.mark.asyncio
async def test_late_retry_grant_lapses_with_the_window() -> None:
    d = Desk(retry_window=60)
    held = await _expire(d)
    d.clock.now += 10
    d.desk.decide(held.id, "approve", "once", "", "bob")
    d.clock.now += 51  # past deadline + retry_window
    assert d.desk.standing_verdict(held.fingerprint, "alice/s1", "deploys") is None


@pytest.mark.asyncio
async def test_late_approval_after_the_window_is_409() -> None:
    d = Desk(retry_window=60)
    held = await _expire(d)
    d.clock.now += 61
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide(held.id, "approve", "once", "", "bob")
    assert caught.value.status == 409
    assert caught.value.current is not None and caught.value.current["state"] == "expired"
    assert d.desk.standing_verdict(held.fingerprint, "alice/s1", "deploys") is None


@pytest.mark.asyncio
async def test_late_deny_is_409_the_timeout_already_denied() -> None:
    d = Desk(retry_window=60)
    held = await _expire(d)
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide(held.id, "deny", "once", "", "bob")
    assert caught.value.status == 409
    assert held.state is State.EXPIRED


@pytest.mark.asyncio
async def test_late_self_approval_is_still_403() -> None:
    d = Desk(retry_window=60)
    held = await _expire(d, subject="alice")
    with pytest.raises(ApprovalError) as caught:
        d.desk.decide(held.id, "approve", "once", "", "alice")
    assert caught.value.status == 403


# --------------------------------------------------------------------------- stop, queue


@pytest.mark.asyncio
async def test_deny_all_denies_every_pending_request_and_wakes_them() -> None:
    d = Desk()
    helds = [d.hold(session=f"s{i}") for i in range(4)]
    d.desk.decide(helds[0].id, "approve", "once", "", "bob")
    waiters = [asyncio.create_task(d.desk.wait(held, None)) for held in helds[1:]]
    await settle()
    assert d.desk.deny_all("the proxy stopped") == 3
    states = await asyncio.wait_for(asyncio.gather(*waiters), 2)
    assert states == [State.DENIED] * 3
    assert helds[0].state is State.APPROVED  # already decided: untouched
    for held in helds[1:]:
        assert held.decided_by is None
        assert held.decision_reason == "the proxy stopped"
    assert d.desk.pending() == []
    assert d.kinds().count("approval.decided") == 4
    assert d.desk.deny_all("again") == 0


@pytest.mark.asyncio
async def test_max_pending_raises_queue_full_and_frees_up_after_a_decision() -> None:
    d = Desk(max_pending=2)
    first, _second = d.hold(), d.hold()
    with pytest.raises(QueueFull):
        d.hold()
    assert len(d.desk.pending()) == 2
    assert d.kinds().count("approval.requested") == 2  # the refused one emitted nothing
    d.desk.decide(first.id, "deny", "once", "", "bob")
    assert d.hold().state is State.PENDING


@pytest.mark.asyncio
async def test_decided_history_is_bounded() -> None:
    d = Desk(max_pending=1)
    for _ in range(200):
        held = d.hold()
        d.desk.decide(held.id, "deny", "once", "", "bob")
    assert len(d.desk._decided) <= 10 * 1 + 100


# --------------------------------------------------------------------------- fingerprint


def test_fingerprint_binds_every_part_of_the_request() -> None:
    base = fp("POST", "api", "/v1/deploy", "a=1", b"body")
    assert base == fp("POST", "api", "/v1/deploy", "a=1", b"body")
    assert base == fp("post", "api", "/v1/deploy", "a=1", b"body")  # methods are case-blind
    variants = {
        "body": fp("POST", "api", "/v1/deploy", "a=1", b"body!"),
        "empty body": fp("POST", "api", "/v1/deploy", "a=1", b""),
        "query": fp("POST", "api", "/v1/deploy", "a=2", b"body"),
        "path": fp("POST", "api", "/v1/deploy/", "a=1", b"body"),
        "method": fp("PUT", "api", "/v1/deploy", "a=1", b"body"),
        "target": fp("POST", "api2", "/v1/deploy", "a=1", b"body"),
    }
    for label, other in variants.items():
        assert other != base, label
    assert len(set(variants.values())) == len(variants)


def test_fingerprint_parts_cannot_slide_into_each_other() -> None:
    assert fp("POST", "ap", "i/x", "", b"") != fp("POST", "api", "/x", "", b"")
    assert fp("POST", "api", "/x?a", "", b"") != fp("POST", "api", "/x", "a", b"")
    assert fp("POST", "api", "/x", "a", b"") != fp("POST", "api", "/xa", "", b"")


def test_fingerprint_accepts_undecodable_text() -> None:
    assert len(fp(path="/caf\udce9")) == 64


# --------------------------------------------------------------------------- learned rules


def _fields(d: Desk, path: str, query: str = "", method: str = "GET") -> dict[str, Any]:
    return {
        "request_id": "r1",
        "session": "alice/s1",
        "subject": "alice",
        "method": method,
        "target": "api",
        "path": path,
        "query": query,
        "rule": "held",
        "reason": "held",
        "preview": "",
        "body_sha256": hashlib.sha256(b"").hexdigest(),
        "fingerprint": fp(method, "api", path, query, b""),
        "deadline": d.clock.now + 30,
    }


def _verdict(rule: dict[str, Any], method: str, path: str, query: str = "") -> Action:
    policy = Policy.from_tables([rule])
    decision = policy.evaluate(Facts(method=method, target="api", path=path, query=query))
    return decision.action  # type: ignore[union-attr]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "path",
    ["/files/a*b", "/files/what?", "/files/x[1]", "/files/**", "/files/{a,b}", "/f/!x", "/a]b"],
)
async def test_rule_for_escapes_glob_characters_in_paths(path: str) -> None:
    d = Desk()
    held = d.desk.hold(**_fields(d, path))
    held.decision_reason = "fine"
    rule = rule_for(held, "allow", "bob")
    assert rule["name"] == f"learned-{held.id}"
    assert rule["action"] == "allow"
    assert rule["target"] == "api" and rule["method"] == "GET"
    assert "bob" in rule["reason"] and "fine" in rule["reason"]
    assert rule["query"] == ""  # exactly no query
    assert _verdict(rule, "GET", path) is Action.ALLOW
    for other in ("/files/aXb", "/files/whatX", "/files/x1", "/files/deep/er", "/files/a", "/fX"):
        assert _verdict(rule, "GET", other) is Action.DENY, other  # default deny: no match
    assert _verdict(rule, "POST", path) is Action.DENY


@pytest.mark.asyncio
async def test_rule_for_escapes_glob_characters_in_queries() -> None:
    d = Desk()
    held = d.desk.hold(**_fields(d, "/search", query="q=*&page=?"))
    rule = rule_for(held, "deny", "bob")
    assert rule["action"] == "deny"
    assert rule["reason"].startswith("denied always by bob")
    policy = Policy.from_tables([rule, {"name": "rest", "action": "allow"}])

    def rule_hit(query: str) -> str | None:
        facts = Facts(method="GET", target="api", path="/search", query=query)
        return policy.evaluate(facts).rule  # type: ignore[union-attr]

    assert rule_hit("q=*&page=?") == rule["name"]
    assert rule_hit("q=anything&page=1") == "rest"


UNBALANCED_BUG = (
    "BUG proxy/matcher.py _check_brackets ignores backslash escapes: the escaped pattern "
    "learned.rule_for writes for a path or query holding an unbalanced '[' (glob.escape "
    "gives '/a\\\\[b') is refused as \"unclosed '['\", so the learned rule never compiles"
)


@pytest.mark.asyncio
@pytest.mark.parametrize(("path", "query"), [("/files/a[b", ""), ("/search", "q=[1")])
async def test_rule_for_an_unbalanced_bracket_compiles(path: str, query: str) -> None:
    d = Desk()
    held = d.desk.hold(**_fields(d, path, query))
    rule = rule_for(held, "allow", "bob")
    assert _verdict(rule, "GET", path, query) is Action.ALLOW


EMPTY_QUERY_GAP = (
    "GAP proxy/learned.py rule_for: with an empty query it writes no query key, so the "
    "learned 'always' rule matches the same path with ANY query (the matcher cannot "
    "express 'no query': query = '' is refused by matcher._as_list)"
)


@pytest.mark.asyncio
async def test_rule_for_without_query_does_not_cover_other_queries() -> None:
    d = Desk()
    held = d.desk.hold(**_fields(d, "/v1/deploy", method="POST"))
    rule = rule_for(held, "allow", "bob")
    assert _verdict(rule, "POST", "/v1/deploy") is Action.ALLOW
    assert _verdict(rule, "POST", "/v1/deploy", "force=true") is Action.DENY


def _rule(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "action": "allow", "reason": "r", "target": "api", **extra}


def test_append_rule_writes_valid_toml_0600_and_keeps_earlier_rules(tmp_path: Path) -> None:
    path = tmp_path / "state" / "learned-rules.toml"
    append_rule(path, _rule("learned-1", path="/a\\*b", reason='with "quotes"\nand a newline'))
    first = path.read_text(encoding="utf-8")
    assert first.startswith(HEADER)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    append_rule(path, _rule("learned-2", method="DELETE", query="x=\\?"))
    append_rule(path, _rule("learned-3", action="deny"))
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(data) == {"rules"}
    assert [rule["name"] for rule in data["rules"]] == ["learned-1", "learned-2", "learned-3"]
    assert data["rules"][0]["path"] == "/a\\*b"
    assert data["rules"][0]["reason"] == 'with "quotes"\nand a newline'
    assert data["rules"][1]["query"] == "x=\\?"
    assert data["rules"][2]["action"] == "deny"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["learned-rules.toml"]  # no temp left
    # the file compiles as a policy, in order
    policy = Policy.from_tables(data["rules"])
    assert [rule.name for rule in policy.rules] == ["learned-1", "learned-2", "learned-3"]


def test_append_rule_replaces_the_file_atomically(tmp_path: Path) -> None:
    """A new inode is renamed over the old one: a reader never sees a half-written file."""
    path = tmp_path / "learned.toml"
    append_rule(path, _rule("learned-1"))
    before = os.stat(path).st_ino
    with path.open("rb") as old_handle:
        append_rule(path, _rule("learned-2"))
        old = tomllib.loads(old_handle.read().decode())
    assert [rule["name"] for rule in old["rules"]] == ["learned-1"]  # old file intact
    assert os.stat(path).st_ino != before
    names = [rule["name"] for rule in tomllib.loads(path.read_text())["rules"]]
    assert names == ["learned-1", "learned-2"]


def test_append_rule_failure_leaves_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "learned.toml"
    append_rule(path, _rule("learned-1"))
    original = path.read_bytes()

    def broken_replace(*_args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("proxy.learned.os.replace", broken_replace)
    with pytest.raises(OSError):
        append_rule(path, _rule("learned-2"))
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["learned.toml"]


def test_append_rule_keeps_rules_written_by_an_earlier_process(tmp_path: Path) -> None:
    path = tmp_path / "learned.toml"
    path.write_text('[[rules]]\nname = "by-hand"\naction = "deny"\n', encoding="utf-8")
    append_rule(path, _rule("learned-9"))
    names = [rule["name"] for rule in tomllib.loads(path.read_text())["rules"]]
    assert names == ["by-hand", "learned-9"]


def test_scope_and_state_values_are_the_api_strings() -> None:
    assert [scope.value for scope in Scope] == ["once", "session", "always"]
    assert {state.value for state in State} == {
        "pending",
        "approved",
        "denied",
        "expired",
        "withdrawn",
    }
