"""How a CONNECT ends: refusals on the raw socket, a hold for a person, the closing event.

Split from ``forward_connect`` so the decision flow there stays readable; everything
here publishes the same lifecycle events and records as the ``Forwarder`` does.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from proxy.approvals import (
    ApprovalDesk,
    DeskClosed,
    QueueFull,
    State,
    destination_of,
    fingerprint,
)
from proxy.config import Config
from proxy.egress import Authority
from proxy.events import EventBus, elapsed_ms
from proxy.identity import Identity
from proxy.policy import Decision
from proxy.server.forward import Tunnel
from proxy.server.forward_front import ConnectHead, ForwardFront
from proxy.server.recording_tap import RecordingTap

PROXY_AUTHENTICATE = [
    ("Proxy-Authenticate", 'Basic realm="sluice"'),
    ("Proxy-Authenticate", 'Bearer realm="sluice"'),
]


class ConnectRefused(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        *,
        decision: str = "refused",
        rule: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason
        self.decision, self.rule, self.headers, self.extra = decision, rule, headers, extra


@dataclass
class Connect:
    front: ForwardFront
    head: ConnectHead
    config: Config
    request_id: str
    started: float
    identity: Identity | None = None
    #: The CONNECT's request record is written (a hold records it before waiting).
    recorded: bool = False


async def hold_connect(
    desk: ApprovalDesk | None,
    bus: EventBus,
    job: Connect,
    decision: Decision,
    target: str,
    authority: Authority,
    identity: Identity,
) -> str:
    if desk is None:
        raise ConnectRefused(
            403,
            "denied",
            f"{decision.reason} (approvals are not enabled)",
            decision="denied",
            rule=decision.rule,
            code="approval_unavailable",
        )
    settings = job.config.approvals
    fp = fingerprint("CONNECT", target, authority.shown, "", b"")
    standing = desk.standing_verdict(
        fp, identity.session, decision.rule, destination_of(authority.host, authority.port)
    )
    if standing is not None:
        if standing.verdict == "allow":
            return "approved"
        raise ConnectRefused(
            403,
            "denied",
            f"denied earlier for this session by {standing.by}",
            decision="denied",
            rule=decision.rule,
            code="approval_denied",
        )
    bus.publish(
        "request.held",
        request_id=job.request_id,
        decision="held",
        rule=decision.rule,
        reason=decision.reason,
        code="held",
    )
    try:
        held = desk.hold(
            request_id=job.request_id,
            session=identity.session,
            subject=identity.subject,
            method="CONNECT",
            target=target,
            path=authority.shown,
            query="",
            rule=decision.rule,
            reason=decision.reason,
            preview="(an opaque TLS tunnel: Sluice sees no request inside)",
            body_sha256=hashlib.sha256(b"").hexdigest(),
            fingerprint=fp,
            deadline=time.time() + settings.timeout,
            session_expires=identity.expires_at,
            host=authority.host,
            port=authority.port,
        )
    except (DeskClosed, QueueFull) as exc:
        raise ConnectRefused(
            503 if isinstance(exc, DeskClosed) else 429,
            "approval_unavailable",
            "no approval can be requested now; retry later",
            rule=decision.rule,
        ) from None
    state = await desk.wait(held, job.front.gone())
    if state is State.APPROVED:
        return "approved"
    if state is State.DENIED:
        by = held.decided_by or "Sluice"
        raise ConnectRefused(
            403,
            "denied",
            f"denied by {by}: {held.decision_reason or 'no reason given'}",
            decision="denied",
            rule=decision.rule,
            code="approval_denied",
        )
    if state is State.EXPIRED:
        raise ConnectRefused(
            403,
            "approval_timeout",
            f"no one decided within {settings.timeout:g}s (approval {held.id})",
            decision="denied",
            rule=decision.rule,
            approval_id=held.id,
        )
    raise ConnectRefused(
        499,
        "client_gone",
        "the agent hung up while held",
        decision="withdrawn",
        rule=decision.rule,
    )


class Outcomes:
    """Events and records for the end of a CONNECT (refused, failed, or a tunnel closed)."""

    def __init__(self, bus: EventBus, tap: RecordingTap | None) -> None:
        self.bus, self.tap = bus, tap

    def tunnel_closed(
        self, job: Connect, tunnel: Tunnel, label: str, mode: str, **counts: int
    ) -> None:
        duration = elapsed_ms(job.started)
        self.bus.publish(
            "request.completed",
            request_id=job.request_id,
            status=200,
            decision=label,
            tunnel=mode,
            bytes_in=counts.get("up"),
            bytes_out=counts.get("down", 0),
            duration_ms=duration,
            **({"requests": counts["requests"]} if "requests" in counts else {}),
        )
        if self.tap is not None and job.identity is not None:
            self.tap.note(
                "tunnel.closed",
                request_id=job.request_id,
                session=job.identity.session,
                mode=mode,
                destination=tunnel.authority.shown,
                bytes_up=counts.get("up"),
                bytes_down=counts.get("down"),
                requests=counts.get("requests"),
                duration_ms=duration,
            )

    def failed(self, job: Connect, label: str, reason: str) -> None:
        self.bus.publish(
            "request.failed",
            request_id=job.request_id,
            status=200,
            decision=label,
            error=reason,
            upstream_error="client_tls_failed",
            bytes_out=0,
            duration_ms=elapsed_ms(job.started),
        )

    def refuse(self, job: Connect, refused: ConnectRefused) -> None:
        extra = dict(refused.extra)
        if refused.rule is not None:
            extra.setdefault("rule", refused.rule)
        headers = [("X-Sluice-Request-Id", job.request_id), *(refused.headers or [])]
        sent = job.front.refuse(
            refused.status,
            refused.error,
            refused.reason,
            headers,
            request_id=job.request_id,
            **extra,
        )
        session = job.identity.session if job.identity else None
        if self.tap is not None and refused.error != "recording_unavailable" and session:
            self.tap.refused(
                request_id=job.request_id,
                session=session,
                recorded=job.recorded,
                status=refused.status,
                headers=[("Content-Type", "application/json"), *headers],
                body=sent,
                decision=refused.decision,
                error=refused.error,
                reason=refused.reason,
            )
        self.bus.publish(
            "request.completed",
            request_id=job.request_id,
            status=refused.status,
            decision=refused.decision,
            rule=refused.rule,
            code=refused.error,
            reason=refused.reason,
            bytes_out=len(sent),
            duration_ms=elapsed_ms(job.started),
        )
