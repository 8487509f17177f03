"""Holding high-risk requests for a human decision.

A held request waits on a future until someone decides, its deadline passes, the agent
hangs up, or the proxy stops; only an explicit approval ever lets it through. Plain
Python (asyncio only), so the rules of the desk are tested without sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class State(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"


class Scope(StrEnum):
    ONCE = "once"
    SESSION = "session"
    ALWAYS = "always"


def destination_of(host: str | None, port: int | None) -> str | None:
    """How a forward destination keys session-wide approvals (None for targets)."""
    return f"{host}:{port}" if host is not None and port is not None else None


def fingerprint(method: str, target: str, path: str, query: str, body: bytes) -> str:
    """What a decision applies to: this exact request, body included, never another."""
    digest = hashlib.sha256()
    for part in (method.upper(), target, path, query):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\x00")
    digest.update(hashlib.sha256(body).digest())
    return digest.hexdigest()


@dataclass(eq=False)
class Held:
    id: str
    request_id: str
    session: str
    subject: str
    method: str
    target: str
    path: str
    query: str
    rule: str | None
    reason: str
    preview: str
    body_sha256: str
    fingerprint: str
    created: float
    deadline: float
    session_expires: float | None = None
    state: State = State.PENDING
    decided_by: str | None = None
    decision_reason: str | None = None
    scope: Scope | None = None
    decided_at: float | None = None
    learned_rule: str | None = None
    #: The destination of a forward request (None for target requests): a learned rule
    #: must stay bound to it, since forward requests share target names across hosts.
    host: str | None = None
    port: int | None = None
    future: asyncio.Future[State] = field(default_factory=asyncio.Future, repr=False)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "request_id": self.request_id,
            "session": self.session,
            "subject": self.subject,
            "method": self.method,
            "target": self.target,
            "path": self.path,
            "query": self.query,
            "rule": self.rule,
            "reason": self.reason,
            "preview": self.preview,
            "body_sha256": self.body_sha256,
            "created": self.created,
            "deadline": self.deadline,
            "state": self.state.value,
            "decided_by": self.decided_by,
            "decision_reason": self.decision_reason,
            "scope": self.scope.value if self.scope else None,
            "decided_at": self.decided_at,
            "learned_rule": self.learned_rule,
        } | ({"host": self.host, "port": self.port} if self.port is not None else {})


class ApprovalError(Exception):
    """A decision that cannot be taken; ``status`` is the HTTP answer for the approver."""

    def __init__(self, status: int, error: str, reason: str, current: dict[str, Any] | None = None):
        super().__init__(reason)
        self.status, self.error, self.reason, self.current = status, error, reason, current


class QueueFull(Exception):
    pass


class DeskClosed(Exception):
    """The proxy is stopping: nothing new is held."""


EventSink = Callable[[str, dict[str, Any]], None]
Learn = Callable[[Held, str, str], str]  # (held, "allow" | "deny", approver) -> rule name


@dataclass
class _Grant:
    verdict: str  # "allow" | "deny"
    by: str | None
    until: float


class ApprovalDesk:
    def __init__(
        self,
        *,
        max_pending: int,
        retry_window: float,
        emit: EventSink,
        learn: Learn | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_pending = max_pending
        self.retry_window = retry_window
        self.emit = emit
        self.learn = learn
        self.clock = clock
        self._pending: OrderedDict[str, Held] = OrderedDict()
        self._decided: OrderedDict[str, Held] = OrderedDict()  # kept for 409s and late approvals
        #: (session, rule, destination): a forward destination is part of what was approved
        self._session_grants: dict[tuple[str, str | None, str | None], _Grant] = {}
        self._retry_grants: dict[tuple[str, str], _Grant] = {}
        self._ids = itertools.count(1)
        self.closed = False
        self._prefix = secrets.token_hex(3)

    # -- before holding -------------------------------------------------------------------

    def standing_verdict(
        self, fp: str, session: str, rule: str | None, destination: str | None = None
    ) -> _Grant | None:
        """A decision already taken for this request: a late approval (used once) or a
        session-wide answer for this rule (and, for forward requests, this host:port)."""
        now = self.clock()
        grant = self._retry_grants.pop((session, fp), None)
        if grant is not None and now < grant.until:
            return grant
        grant = self._session_grants.get((session, rule, destination))
        if grant is not None and now < grant.until:
            return grant
        return None

    def hold(self, **fields: Any) -> Held:
        if self.closed:
            raise DeskClosed
        if len(self._pending) >= self.max_pending:
            raise QueueFull
        held = Held(id=f"ap-{self._prefix}-{next(self._ids)}", created=self.clock(), **fields)
        self._pending[held.id] = held
        self.emit("approval.requested", held.summary())
        return held

    # -- waiting --------------------------------------------------------------------------

    async def wait(self, held: Held, gone: asyncio.Future[Any] | None) -> State:
        """Until decided, expired, or the agent hangs up (``gone`` completes).

        ``gone`` belongs to the connection and outlives this request: it is watched, never
        cancelled here.
        """
        timeout = max(0.0, held.deadline - self.clock())
        waiters: set[asyncio.Future[Any]] = {held.future}
        watcher = gone
        if watcher is not None:
            waiters.add(watcher)
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if held.future.done():
            return held.future.result()
        if watcher is not None and watcher.done():
            self._close(held, State.WITHDRAWN, None, "the agent hung up while held")
            self.emit("approval.withdrawn", held.summary())
            return State.WITHDRAWN
        self._close(held, State.EXPIRED, None, "no decision before the deadline")
        self.emit("approval.expired", held.summary())
        return State.EXPIRED

    # -- deciding -------------------------------------------------------------------------

    def decide(
        self, approval_id: str, decision: str, scope: str, reason: str, approver: str
    ) -> dict[str, Any]:
        if decision not in ("approve", "deny"):
            raise ApprovalError(400, "bad_request", 'decision must be "approve" or "deny"')
        try:
            chosen = Scope(scope)
        except ValueError:
            raise ApprovalError(
                400, "bad_request", "scope must be once, session or always"
            ) from None
        held = self._pending.get(approval_id) or self._decided.get(approval_id)
        if held is None:
            raise ApprovalError(404, "not_found", "no such approval")
        if approver == held.subject:
            raise ApprovalError(403, "self_approval", "an approver cannot decide their own request")
        late = held.state is State.EXPIRED and self.clock() < held.deadline + self.retry_window
        if held.state is not State.PENDING and not (late and decision == "approve"):
            raise ApprovalError(
                409, "already_decided", "this approval was already closed", held.summary()
            )
        verdict = "allow" if decision == "approve" else "deny"
        held.decision_reason = reason
        if chosen is Scope.ALWAYS and self.learn is not None:
            held.learned_rule = self.learn(held, verdict, approver)
        if chosen is Scope.SESSION:
            until = held.session_expires or self.clock() + 8 * 3600
            key = (held.session, held.rule, destination_of(held.host, held.port))
            self._session_grants[key] = _Grant(verdict, approver, until)
        if late:
            # The agent was already told it timed out; its identical retry goes through once.
            self._retry_grants[(held.session, held.fingerprint)] = _Grant(
                "allow", approver, held.deadline + self.retry_window
            )
            held.decided_by, held.decision_reason, held.scope = approver, reason, chosen
            held.decided_at = self.clock()
            held.state = State.APPROVED
            self.emit("approval.decided", held.summary())
            return held.summary()
        state = State.APPROVED if verdict == "allow" else State.DENIED
        self._close(held, state, approver, reason, chosen)
        self.emit("approval.decided", held.summary())
        return held.summary()

    def _close(
        self,
        held: Held,
        state: State,
        by: str | None,
        reason: str | None,
        scope: Scope | None = None,
    ) -> None:
        held.state, held.decided_by, held.decision_reason = state, by, reason
        held.scope, held.decided_at = scope, self.clock()
        self._pending.pop(held.id, None)
        self._decided[held.id] = held
        while len(self._decided) > 10 * self.max_pending + 100:
            self._decided.popitem(last=False)
        if not held.future.done():
            held.future.set_result(state)

    def deny_all(self, reason: str) -> int:
        """The proxy is stopping: everything pending is denied, never approved; nothing new
        is held after this."""
        self.closed = True
        count = 0
        for held in list(self._pending.values()):
            self._close(held, State.DENIED, None, reason)
            self.emit("approval.decided", held.summary())
            count += 1
        return count

    def pending(self) -> list[dict[str, Any]]:
        return [held.summary() for held in self._pending.values()]

    def get(self, approval_id: str) -> Held | None:
        return self._pending.get(approval_id) or self._decided.get(approval_id)
