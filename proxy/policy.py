"""Ordered allow/deny/approve rules; first match wins and no match means deny.

Evaluation is pure: the server hands in ``Facts`` and gets a ``Decision`` back, or
``NEEDS_BODY`` when a body rule could decide and the body has not been read yet.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from proxy.matcher import BodyNotLoaded, Facts, Matcher, MatcherError, compile_matcher

log = logging.getLogger("sluice.policy")

RULE_META_KEYS = frozenset({"name", "action", "reason"})
DEFAULT_DENY_REASON = "no rule allows this request (default deny)"
#: Rules written from "always" approvals (``proxy.learned``) are named with this prefix.
LEARNED_PREFIX = "learned-"


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVE = "approve"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    rule: str | None
    reason: str
    #: A stable machine-readable code for agents: "denied", "policy_error", "body_too_large", ...
    code: str = "denied"
    #: For a request a person decided: approval id, approver, scope, held_ms (recorded).
    approval: Mapping[str, object] | None = None

    @property
    def allowed(self) -> bool:
        return self.action is Action.ALLOW


class _NeedsBody:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEEDS_BODY"


NEEDS_BODY: Final = _NeedsBody()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    action: Action
    reason: str
    matcher: Matcher


class PolicyError(ValueError):
    """A rule that cannot compile; ``index`` and ``field`` locate it in the config."""

    def __init__(self, index: int, field_name: str, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.field = field_name
        self.message = message


def compile_rule(index: int, table: Mapping[str, object]) -> Rule:
    try:
        action = Action(str(table.get("action", "")))
    except ValueError:
        raise PolicyError(index, "action", "action must be one of allow, deny, approve") from None
    spec = {key: value for key, value in table.items() if key not in RULE_META_KEYS}
    try:
        matcher = compile_matcher(spec, for_policy=True)
    except MatcherError as exc:
        raise PolicyError(index, exc.field, exc.message) from None
    reason = str(table.get("reason") or f"rule {table.get('name')!s} ({action.value})")
    return Rule(str(table["name"]), action, reason, matcher)


class Policy:
    """An immutable, compiled rule list; a reload builds a new one and swaps it in."""

    def __init__(self, rules: Sequence[Rule], *, max_body_inspect: int = 1 << 20) -> None:
        self.rules = tuple(rules)
        self.max_body_inspect = max_body_inspect
        self.reads_bodies = any(rule.matcher.needs_body for rule in self.rules)
        #: Building the header map costs; skip it when no rule looks at headers.
        self.reads_headers = any("header" in rule.matcher.fields for rule in self.rules)
        #: Some rule asks whether the request carries a secret: scan what it sends.
        self.scans_secrets = any(rule.matcher.secret_wanted is not None for rule in self.rules)
        self._candidates: dict[tuple[str | None, str], tuple[Rule, ...]] = {}

    def candidates(self, target: str | None, method: str) -> tuple[Rule, ...]:
        """The rules whose exact target and method limits admit this pair, in order.

        Skipping the others cannot change the outcome: they could never match.
        """
        key = (target, method)
        found = self._candidates.get(key)
        if found is None:
            method = method.upper()
            found = tuple(
                rule
                for rule in self.rules
                if (rule.matcher.targets is None or target in rule.matcher.targets)
                and (rule.matcher.methods is None or method in rule.matcher.methods)
            )
            if len(self._candidates) < 4096:
                self._candidates[key] = found
        return found

    @classmethod
    def from_tables(cls, tables: Sequence[Mapping[str, object]], **kwargs: int) -> Policy:
        return cls([compile_rule(index, table) for index, table in enumerate(tables)], **kwargs)

    def evaluate(self, facts: Facts) -> Decision | _NeedsBody:
        """Walk the rules in order. Any error while matching denies, naming the rule."""
        for rule in self.candidates(facts.target, facts.method):
            try:
                if rule.matcher.matches(facts):
                    return Decision(rule.action, rule.name, rule.reason, _code(rule.action))
            except BodyNotLoaded:
                return NEEDS_BODY
            except Exception as exc:  # a matcher must never let a request through by failing
                log.warning("rule %s failed to evaluate: %s", rule.name, type(exc).__name__)
                return Decision(
                    Action.DENY, rule.name, f"policy error in rule {rule.name}", "policy_error"
                )
        return Decision(Action.DENY, None, DEFAULT_DENY_REASON, "denied")

    def names_host(self, rule_name: str | None, host: str) -> bool:
        """Whether the rule lists this exact host (no glob): naming a destination
        explicitly is what lets a forward request reach a private address."""
        if rule_name is None or rule_name.startswith(LEARNED_PREFIX):
            return False  # an approval of one request never opens private addresses
        for rule in self.rules:
            if rule.name == rule_name:
                hosts = rule.matcher.hosts
                return hosts is not None and host.lower().removesuffix(".") in hosts
        return False

    def body_too_large(self, facts: Facts) -> Decision:
        """A body rule could apply but the body exceeds what we inspect: deny, never guess."""
        for rule in self.rules:
            if rule.matcher.needs_body and rule.matcher.matches_head(facts):
                return Decision(
                    Action.DENY,
                    rule.name,
                    f"request body exceeds {self.max_body_inspect} bytes, too large for "
                    f"body rule {rule.name}",
                    "body_too_large",
                )
        return Decision(Action.DENY, None, "request body too large to inspect", "body_too_large")


def _code(action: Action) -> str:
    return {Action.ALLOW: "allowed", Action.DENY: "denied", Action.APPROVE: "approval_required"}[
        action
    ]
