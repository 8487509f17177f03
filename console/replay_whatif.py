"""What-if: the decision another config would make for every recorded request.

Facts are rebuilt from the request record as the proxy built them (method, target,
decoded path, raw query, Host, headers, subject and groups from ``session.start``, the
body), then ``Policy.evaluate`` runs exactly as in the proxy, including the second pass
with the body and the outbound secret scan for ``carries_secret`` rules.

Limits, shown per row: credential headers were recorded as ``[REDACTED]``; a body the
recorder truncated is evaluated on its prefix; a streamed body was not recorded; values
masked earlier in the session are not known (only their fingerprints were recorded).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from console.replay_model import Timeline
from proxy.config import Config
from proxy.matcher import Facts, headers_for_facts
from proxy.policy import NEEDS_BODY, Action, Decision
from proxy.recording import Recording
from proxy.recording import format as fmt

_OWN_CREDENTIALS = frozenset({"authorization", "proxy-authorization"})
#: The decision record's ``action`` as the policy action that produced it.
_RECORDED = {"allowed": "allow", "denied": "deny", "approved": "approve", "held": "approve"}
_SHOWN = {"allow": "allow", "deny": "deny", "approve": "hold", "?": "?"}


@dataclass(frozen=True)
class WhatIf:
    """One recorded request: what happened, and what ``config`` would have decided."""

    request_id: str
    seq: int
    pos: int
    method: str
    target: str
    path: str
    recorded: str
    recorded_rule: str | None
    would: str
    would_rule: str | None
    reason: str
    note: str = ""

    @property
    def changed(self) -> bool:
        return self.would != self.recorded

    @property
    def rule_changed(self) -> bool:
        return not self.changed and self.would_rule != self.recorded_rule

    @property
    def shown_recorded(self) -> str:
        return _SHOWN.get(self.recorded, self.recorded)

    @property
    def shown_would(self) -> str:
        return _SHOWN.get(self.would, self.would)


SecretCheck = Callable[[Facts, bytes, list[list[str]]], bool]


def secret_check(config: Config) -> SecretCheck:
    """The proxy's outbound scan (``carries_secret``) with this config's masking rules."""
    from proxy.masking.builtin import builtin_rules
    from proxy.masking.encodings import DecodeError, decode_body, scan
    from proxy.masking.engine import Masker
    from proxy.masking.rules import select_rules

    rules = select_rules(
        builtin_rules(),
        disable=list(config.masking.disable),
        custom=[rule.model_dump() for rule in config.masking.rules],
    )
    masker = Masker(rules, hmac_key=os.urandom(32))  # fingerprints are not compared here

    def check(facts: Facts, body: bytes, headers: list[list[str]]) -> bool:
        encoding = (facts.headers.get("content-encoding") or "").strip().lower()
        if body and encoding and encoding != "identity":
            try:
                body = decode_body(body, encoding, max_size=64 * 1024 * 1024)
            except DecodeError:
                return True  # the proxy fails closed when it cannot look inside
        parts = [body, facts.query.encode("latin-1", "replace"), facts.path.encode()]
        parts += [
            str(value).encode("latin-1", "replace")
            for name, value in headers
            if str(name).lower() not in _OWN_CREDENTIALS
        ]
        return any(scan(masker, part) for part in parts if part)

    return check


def facts_of(request: dict[str, Any], subject: str | None, groups: tuple[str, ...]) -> Facts:
    """A recorded request as the matcher facts the proxy built for it (without the body)."""
    from urllib.parse import unquote

    headers = [list(pair) for pair in request.get("headers") or []]
    url = str(request.get("url") or "/")
    merged = headers_for_facts((str(n), str(v)) for n, v in headers)
    host, port = merged.get("host", ""), None
    method = str(request.get("method") or "")
    if method == "CONNECT" or url.startswith(("http://", "https://")):
        # A forward request: its URL names the destination the proxy matched on.
        from urllib.parse import urlsplit

        parts = urlsplit(url if method != "CONNECT" else f"//{url}")
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        url = (
            "/"
            if method == "CONNECT"
            else (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        )
    raw_path, _, query = url.partition("?")
    return Facts(
        method=method,
        target=request.get("target"),
        path=unquote(raw_path),
        query=query,
        host=host,
        port=port,
        headers=merged,
        subject=subject,
        groups=groups,
        content_type=merged.get("content-type", ""),
    )


def decide(
    config: Config,
    request: dict[str, Any],
    body: bytes | None,
    subject: str | None,
    groups: tuple[str, ...],
    check: Callable[[], SecretCheck],
) -> tuple[Decision | None, str]:
    """(decision, note); decision None when it needs a body that was not recorded."""
    policy = config.policy
    facts = facts_of(request, subject, groups)
    decision = policy.evaluate(facts)
    note = ""
    if decision is NEEDS_BODY:
        if body is None:
            return None, "needs the request body, which was not recorded (streamed)"
        if len(body) > policy.max_body_inspect:
            decision = policy.body_too_large(facts)
        else:
            found = None
            if policy.scans_secrets:
                found = check()(facts, body, [list(p) for p in request.get("headers") or []])
            decision = policy.evaluate(replace(facts, body=body, carries_secret=found))
        if (request.get("body") or {}).get("truncated"):
            note = "decided on the recorded prefix of a truncated body"
    if not isinstance(decision, Decision):
        decision = Decision(Action.DENY, None, "policy could not decide", "policy_error")
    return decision, note


def recorded_outcome(timeline: Timeline, request_id: str) -> tuple[str, str | None]:
    """The policy's recorded verdict: held if an approval was asked, else the decision."""
    events = timeline.flow_events(request_id)
    for event in events:
        if event.kind == "approval.requested":
            return "approve", event.data.get("rule")
    for event in events:
        if event.kind == fmt.DECISION or (
            event.kind == fmt.REQUEST and event.data.get("action") is not None
        ):
            action = str(event.data.get("action"))
            return _RECORDED.get(action, action), event.data.get("rule")
    return "?", None


def what_if(recording: Recording, timeline: Timeline, config: Config) -> list[WhatIf]:
    """Every recorded request of the session; changed decisions first, then in seq order."""
    info = timeline.info
    checker: list[SecretCheck] = []

    def lazy_check() -> SecretCheck:
        if not checker:
            checker.append(secret_check(config))
        return checker[0]

    rows: list[WhatIf] = []
    for request_id in timeline.flow_ids:
        request_event = timeline.flow_event(request_id, fmt.REQUEST)
        if request_event is None:
            continue
        request = recording.get(request_event.seq)
        body = recording.body(request, "request") if request.get("body") else None
        streamed = timeline.flow_event(request_id, fmt.REQUEST_BODY)
        if body is None and streamed is not None:
            sent = recording.get(streamed.seq)
            if sent.get("body_truncated_at") is None:  # a cut body cannot stand in for it
                body = recording.body(sent, "request")
        if body is None and not request.get("body_streamed"):
            body = b""
        decision, note = decide(config, request, body, info.subject, info.groups, lazy_check)
        recorded, recorded_rule = recorded_outcome(timeline, request_id)
        raw_path = str(request.get("url") or "/").partition("?")[0]
        if decision is None:
            would, rule, reason = "?", None, note
            note = ""
        else:
            would, rule, reason = decision.action.value, decision.rule, decision.reason
        rows.append(
            WhatIf(
                request_id,
                request_event.seq,
                request_event.pos,
                str(request.get("method") or ""),
                str(request.get("target") or ""),
                raw_path,
                recorded,
                recorded_rule,
                would,
                rule,
                reason,
                note,
            )
        )
    rows.sort(key=lambda row: (not row.changed, not row.rule_changed, row.seq))
    return rows
