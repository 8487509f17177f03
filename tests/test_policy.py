"""Policy evaluation: ordered rules, first match wins, default deny, never fail open."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from proxy.matcher import Facts, Matcher, compile_matcher
from proxy.policy import (
    DEFAULT_DENY_REASON,
    NEEDS_BODY,
    Action,
    Decision,
    Policy,
    PolicyError,
    Rule,
    compile_rule,
)


def policy(*tables: dict[str, object], max_body_inspect: int = 1 << 20) -> Policy:
    return Policy.from_tables(list(tables), max_body_inspect=max_body_inspect)


def decided(result: object) -> Decision:
    assert isinstance(result, Decision), result
    return result


GET_README = Facts(method="GET", target="repo", path="/README.md")


def test_first_match_wins() -> None:
    rules = policy(
        {"name": "deny-readme", "path": "/README.md", "action": "deny"},
        {"name": "allow-get", "method": "GET", "action": "allow"},
    )
    decision = decided(rules.evaluate(GET_README))
    assert decision.action is Action.DENY
    assert decision.rule == "deny-readme"
    assert decision.code == "denied"
    assert not decision.allowed


def test_order_matters() -> None:
    rules = policy(
        {"name": "allow-get", "method": "GET", "action": "allow"},
        {"name": "deny-readme", "path": "/README.md", "action": "deny"},
    )
    decision = decided(rules.evaluate(GET_README))
    assert decision.action is Action.ALLOW
    assert decision.rule == "allow-get"
    assert decision.code == "allowed"
    assert decision.allowed


def test_default_deny() -> None:
    rules = policy({"name": "allow-post", "method": "POST", "action": "allow"})
    decision = decided(rules.evaluate(GET_README))
    assert decision == Decision(Action.DENY, None, DEFAULT_DENY_REASON, "denied")
    assert "default deny" in decision.reason


def test_empty_policy_denies() -> None:
    decision = decided(Policy([]).evaluate(Facts()))
    assert decision.action is Action.DENY and decision.rule is None


def test_approve_action() -> None:
    rules = policy({"name": "ask", "method": "DELETE", "action": "approve", "reason": "ask first"})
    decision = decided(rules.evaluate(Facts(method="DELETE", path="/x")))
    assert decision.action is Action.APPROVE
    assert decision.rule == "ask"
    assert decision.reason == "ask first"
    assert decision.code == "approval_required"
    assert not decision.allowed


def test_default_reason_names_rule_and_action() -> None:
    rules = policy({"name": "r1", "action": "allow"})
    assert decided(rules.evaluate(Facts())).reason == "rule r1 (allow)"


BODY_RULES = (
    {"name": "read", "method": "GET", "action": "allow"},
    {
        "name": "no-main",
        "method": "POST",
        "path": "/api/push",
        "body": r'"branch"\s*:\s*"main"',
        "action": "deny",
        "reason": "not main",
    },
    {"name": "push", "method": "POST", "path": "/api/push", "action": "allow"},
)
PUSH = Facts(method="POST", target="repo", path="/api/push")


def test_needs_body_when_body_rule_head_matches() -> None:
    rules = policy(*BODY_RULES)
    assert rules.reads_bodies
    assert rules.evaluate(PUSH) is NEEDS_BODY
    assert repr(NEEDS_BODY) == "NEEDS_BODY"


def test_no_needs_body_when_body_rule_head_does_not_match() -> None:
    rules = policy(*BODY_RULES)
    other = decided(rules.evaluate(Facts(method="POST", path="/api/other")))
    assert other.rule is None and other.action is Action.DENY


def test_no_needs_body_when_an_earlier_rule_decides() -> None:
    rules = policy(*BODY_RULES)
    assert decided(rules.evaluate(dataclasses.replace(PUSH, method="GET"))).rule == "read"


def test_evaluation_with_body() -> None:
    rules = policy(*BODY_RULES)
    to_main = decided(rules.evaluate(dataclasses.replace(PUSH, body=b'{"branch": "main"}')))
    assert (to_main.action, to_main.rule, to_main.reason) == (Action.DENY, "no-main", "not main")
    to_dev = decided(rules.evaluate(dataclasses.replace(PUSH, body=b'{"branch": "dev"}')))
    assert (to_dev.action, to_dev.rule) == (Action.ALLOW, "push")
    empty = decided(rules.evaluate(dataclasses.replace(PUSH, body=b"")))
    assert empty.rule == "push"


def test_policy_without_body_rules_does_not_read_bodies() -> None:
    assert not policy({"name": "a", "action": "allow"}).reads_bodies


def test_body_too_large_names_the_rule() -> None:
    rules = policy(*BODY_RULES, max_body_inspect=1024)
    decision = rules.body_too_large(PUSH)
    assert decision.action is Action.DENY
    assert decision.rule == "no-main"
    assert decision.code == "body_too_large"
    assert "no-main" in decision.reason and "1024" in decision.reason


def test_body_too_large_without_an_applicable_body_rule() -> None:
    decision = policy(*BODY_RULES).body_too_large(Facts(method="POST", path="/elsewhere"))
    assert (decision.action, decision.rule, decision.code) == (
        Action.DENY,
        None,
        "body_too_large",
    )


def _explode(_facts: Facts) -> bool:
    raise RuntimeError("boom")


def test_a_failing_matcher_denies_with_policy_error(caplog: pytest.LogCaptureFixture) -> None:
    rules = Policy(
        [
            Rule("fine", Action.ALLOW, "fine", compile_matcher({"method": "POST"})),
            Rule("broken", Action.ALLOW, "would allow", Matcher((_explode,))),
            Rule("everything", Action.ALLOW, "allow all", Matcher()),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="sluice.policy"):
        decision = decided(rules.evaluate(GET_README))
    assert decision.action is Action.DENY
    assert decision.rule == "broken"
    assert decision.code == "policy_error"
    assert "broken" in decision.reason
    assert any("broken" in record.getMessage() for record in caplog.records)
    # A rule before the broken one still decides normally.
    assert decided(rules.evaluate(Facts(method="POST"))).rule == "fine"


def test_a_failing_deny_rule_still_denies() -> None:
    rules = Policy([Rule("broken", Action.DENY, "x", Matcher((_explode,)))])
    assert decided(rules.evaluate(Facts())).code == "policy_error"


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ({"name": "r", "action": "maybe"}, "action"),
        ({"name": "r"}, "action"),
        ({"name": "r", "action": "allow", "verb": "GET"}, "verb"),
        ({"name": "r", "action": "allow", "status": 500}, "status"),
        ({"name": "r", "action": "allow", "body": "("}, "body"),
    ],
)
def test_compile_errors_locate_the_rule(table: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        Policy.from_tables([{"name": "ok", "action": "allow"}, table])
    assert info.value.index == 1
    assert info.value.field == field


def test_compile_rule_keeps_meta_out_of_the_matcher() -> None:
    compiled = compile_rule(0, {"name": "r", "action": "deny", "reason": "x", "method": "GET"})
    assert compiled.matcher.fields == ("method",)
    assert (compiled.name, compiled.action, compiled.reason) == ("r", Action.DENY, "x")


# --- a realistic 20-rule policy ----------------------------------------------------------

TWENTY = [
    {"name": "creds", "path": ["**/.env", "**/.env.*", "**/*.pem", "**/.ssh/**"], "action": "deny"},
    {"name": "git-internals", "path": "**/.git/**", "action": "deny"},
    {"name": "admin-api", "path": "/admin/**", "action": "deny"},
    {"name": "no-delete-repo", "target": "repo", "method": "DELETE", "action": "approve"},
    {
        "name": "push-main",
        "target": "repo",
        "method": "POST",
        "path": "/api/push",
        "body": r'"branch"\s*:\s*"(main|master)"',
        "action": "deny",
    },
    {
        "name": "push-agent",
        "target": "repo",
        "method": "POST",
        "path": "/api/push",
        "body": r'"branch"\s*:\s*"agent/',
        "action": "allow",
    },
    {"name": "push-other", "target": "repo", "path": "/api/push", "action": "approve"},
    {"name": "repo-read", "target": "repo", "method": ["GET", "HEAD"], "action": "allow"},
    {
        "name": "build-logs",
        "target": "build",
        "method": "GET",
        "path": "/api/builds/**",
        "action": "allow",
    },
    {
        "name": "build-start",
        "target": "build",
        "method": "POST",
        "path": "/api/builds",
        "content_type": "application/json",
        "action": "allow",
    },
    {
        "name": "build-cancel",
        "target": "build",
        "method": "DELETE",
        "path": "/api/builds/*",
        "action": "approve",
    },
    {"name": "pkg-mirror", "target": "pkgs", "host": "*.pypi.org", "action": "allow"},
    {"name": "pkg-upload", "target": "pkgs", "method": ["PUT", "POST"], "action": "deny"},
    {"name": "docs-search", "target": "docs", "query": {"q": "*"}, "action": "allow"},
    {"name": "docs-debug", "target": "docs", "query": "*debug=1*", "action": "deny"},
    {"name": "docs-read", "target": "docs", "method": "GET", "action": "allow"},
    {"name": "v2-only", "target": "api", "header": {"x-api-version": "2.*"}, "action": "allow"},
    {"name": "ops-group", "target": "api", "groups": ["ops", "sre"], "action": "allow"},
    {"name": "bot-subject", "target": "api", "subject": "bot-*", "action": "approve"},
    {"name": "api-deny", "target": "api", "action": "deny", "reason": "api needs v2"},
]

SAMPLE_REQUESTS: list[tuple[Facts, str | None, Action | None]] = [
    (Facts(method="GET", target="repo", path="/src/.env"), "creds", Action.DENY),
    (Facts(method="GET", target="build", path="/keys/server.pem"), "creds", Action.DENY),
    (Facts(method="GET", target="repo", path="/x/.git/config"), "git-internals", Action.DENY),
    (Facts(method="GET", target="repo", path="/admin/users"), "admin-api", Action.DENY),
    (Facts(method="delete", target="repo", path="/files/a"), "no-delete-repo", Action.APPROVE),
    (Facts(method="POST", target="repo", path="/api/push"), None, None),  # needs the body
    (
        Facts(method="POST", target="repo", path="/api/push", body=b'{"branch":"master"}'),
        "push-main",
        Action.DENY,
    ),
    (
        Facts(method="POST", target="repo", path="/api/push", body=b'{"branch": "agent/f"}'),
        "push-agent",
        Action.ALLOW,
    ),
    (
        Facts(method="POST", target="repo", path="/api/push", body=b'{"branch": "dev"}'),
        "push-other",
        Action.APPROVE,
    ),
    (Facts(method="HEAD", target="repo", path="/README.md"), "repo-read", Action.ALLOW),
    (Facts(method="PUT", target="repo", path="/README.md"), None, Action.DENY),
    (Facts(method="GET", target="build", path="/api/builds/7/log"), "build-logs", Action.ALLOW),
    (
        Facts(
            method="POST",
            target="build",
            path="/api/builds",
            content_type="application/json; charset=utf-8",
        ),
        "build-start",
        Action.ALLOW,
    ),
    (
        Facts(method="POST", target="build", path="/api/builds", content_type="text/plain"),
        None,
        Action.DENY,
    ),
    (Facts(method="DELETE", target="build", path="/api/builds/7"), "build-cancel", Action.APPROVE),
    (
        Facts(method="PUT", target="pkgs", path="/simple/x", host="files.PyPI.org:443"),
        "pkg-mirror",
        Action.ALLOW,
    ),
    (
        Facts(method="PUT", target="pkgs", path="/upload", host="evil.test"),
        "pkg-upload",
        Action.DENY,
    ),
    (
        Facts(method="GET", target="docs", path="/s", query="q=asyncio&debug=1"),
        "docs-search",
        Action.ALLOW,
    ),
    (Facts(method="GET", target="docs", path="/s", query="debug=1"), "docs-debug", Action.DENY),
    (Facts(method="GET", target="docs", path="/guide"), "docs-read", Action.ALLOW),
    (
        Facts(method="POST", target="api", path="/x", headers={"x-api-version": "2.1"}),
        "v2-only",
        Action.ALLOW,
    ),
    (
        Facts(method="POST", target="api", path="/x", groups=("dev", "sre")),
        "ops-group",
        Action.ALLOW,
    ),
    (Facts(method="POST", target="api", path="/x", subject="bot-7"), "bot-subject", Action.APPROVE),
    (Facts(method="POST", target="api", path="/x", subject="alice"), "api-deny", Action.DENY),
    (Facts(method="GET", target="unknown", path="/"), None, Action.DENY),
]


@pytest.mark.parametrize(
    ("sample", "rule_name", "action"),
    SAMPLE_REQUESTS,
    ids=[f"{s.method} {s.target}{s.path}" for s, _, _ in SAMPLE_REQUESTS],
)
def test_twenty_rule_policy(sample: Facts, rule_name: str | None, action: Action | None) -> None:
    rules = Policy.from_tables(TWENTY)
    assert len(rules.rules) == 20
    result = rules.evaluate(sample)
    if action is None:
        assert result is NEEDS_BODY
        return
    decision = decided(result)
    assert (decision.rule, decision.action) == (rule_name, action)


def test_twenty_rule_policy_covers_every_rule() -> None:
    hit = {name for _, name, _ in SAMPLE_REQUESTS if name}
    assert hit == {table["name"] for table in TWENTY}
