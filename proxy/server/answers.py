"""How a request ends when it ends early, and how every ending reaches the recording.

The request's record (with its decision) is durable before anything is forwarded or
answered; once it is, whatever the agent receives is recorded as its response, a refusal
included. A refusal before that point is recorded as an error of its own.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from proxy.events import CURRENT_SESSION, EventBus, elapsed_ms
from proxy.identity import Identity
from proxy.policy import Decision
from proxy.server.forward import ForwardRequest
from proxy.server.forward_outcomes import PROXY_AUTHENTICATE
from proxy.server.guard import error_response
from proxy.server.recording_tap import RecordingRefused, RecordingTap, decision_fields
from proxy.server.requestcheck import RequestTarget

log = logging.getLogger("sluice.forwarder")
_RECORDED = web.RequestKey("sluice_recorded_session", str)  # the request's record is written


class Refusal(Exception):
    """Ends a request early with Sluice's own JSON answer."""

    def __init__(
        self,
        status: int,
        error: str,
        reason: str,
        *,
        rule: str | None = None,
        decision: str = "refused",
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason = status, error, reason
        self.rule, self.decision, self.headers = rule, decision, headers or {}
        self.extra = extra or {}


def _unrecorded(exc: RecordingRefused) -> Refusal:
    log.error("recording unavailable, refusing request: %s", exc.reason)
    return Refusal(
        503,
        "recording_unavailable",
        "the session recorder cannot write; nothing is forwarded unrecorded",
    )


class Answers:
    """Sluice's own answers (denials, refusals) and the records of every answer."""

    def __init__(self, bus: EventBus, tap: RecordingTap | None) -> None:
        self.bus = bus
        self.tap = tap

    async def record_request(
        self,
        request: web.Request,
        identity: Identity,
        where: RequestTarget,
        body: bytes | None,
        request_id: str,
        decision: Decision,
        label: str,
        fwd: ForwardRequest | None = None,
    ) -> None:
        """Durable before anything is forwarded or answered; no recording, no request."""
        if self.tap is None:
            return
        request[_RECORDED] = identity.session  # its answer, whatever it is, is recorded too
        url = where.raw_path + (f"?{where.raw_query}" if where.raw_query else "")
        agent_url = f"{request.scheme}://{request.host}{request.raw_path}"
        if fwd is not None:
            url = agent_url = fwd.base_url() + url  # the destination, absolute
        try:
            await self.tap.request(
                identity=identity,
                request_id=request_id,
                method=request.method,
                target=where.name,
                url=url,
                agent_url=agent_url,
                client=request.remote or "",
                headers=request.headers.items(),
                body=body,
                streamed=body is None and request.body_exists,
                decision=decision_fields(decision, label),
                secret_values=[],
            )
        except RecordingRefused as exc:
            raise _unrecorded(exc) from None

    async def record_decision(
        self, request_id: str, session: str, decision: Decision, label: str
    ) -> None:
        """How a held request ended (approved, denied, expired): durable before it goes on."""
        if self.tap is None:
            return
        try:
            await self.tap.decision(
                request_id=request_id, session=session, decision=decision_fields(decision, label)
            )
        except RecordingRefused as exc:
            raise _unrecorded(exc) from None

    def record_answer(self, request_id: str, session: str, response: web.Response) -> None:
        if self.tap is not None:
            self.tap.answered(
                request_id=request_id,
                session=session,
                status=response.status,
                headers=response.headers.items(),
                body=bytes(response.body or b""),
            )

    def deny(self, request_id: str, started: float, decision: Decision) -> web.Response:
        response = error_response(
            403,
            "denied",
            decision.reason,
            rule=decision.rule,
            request_id=request_id,
            code=decision.code,
        )
        response.headers["X-Sluice-Request-Id"] = request_id
        self.bus.publish(
            "request.completed",
            request_id=request_id,
            status=403,
            decision="denied",
            rule=decision.rule,
            bytes_out=len(response.body),
            duration_ms=elapsed_ms(started),
        )
        return response

    def refuse(
        self, request: web.Request, request_id: str, started: float, refusal: Refusal
    ) -> web.Response:
        """A refusal that is not a policy decision (bad input, identity, limits, credentials).

        Once the request is in the recording, the refusal is recorded as its response (what
        the agent received); before that, as an error record of its own.
        """
        extra = dict(refusal.extra)
        if refusal.rule is not None:
            extra.setdefault("rule", refusal.rule)
        response = error_response(
            refusal.status, refusal.error, refusal.reason, request_id=request_id, **extra
        )
        response.headers["X-Sluice-Request-Id"] = request_id
        response.headers.update(refusal.headers)
        if refusal.status == 407:
            for name, value in PROXY_AUTHENTICATE:
                response.headers.add(name, value)
        if self.tap is not None and refusal.error != "recording_unavailable":
            recorded = request.get(_RECORDED)
            self.tap.refused(
                request_id=request_id,
                session=recorded if recorded is not None else CURRENT_SESSION.get(),
                recorded=recorded is not None,
                status=refusal.status,
                headers=response.headers.items(),
                body=bytes(response.body or b""),
                decision=refusal.decision,
                error=refusal.error,
                reason=refusal.reason,
            )
        self.bus.publish(
            "request.completed",
            request_id=request_id,
            status=refusal.status,
            decision=refusal.decision,
            rule=refusal.rule,
            code=refusal.error,
            reason=refusal.reason,
            bytes_out=len(response.body),
            duration_ms=elapsed_ms(started),
        )
        return response
