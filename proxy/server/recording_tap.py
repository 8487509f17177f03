"""What the proxy writes into the recording, and when.

The request record (with its decision) is durable before anything is forwarded; if the
recorder cannot write, the request is refused (503 recording_unavailable), never forwarded
unrecorded. Responses are recorded as the agent received them: masked, with their spans.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from proxy.events import EventBus
from proxy.identity import Identity
from proxy.policy import Decision
from proxy.recording import Recorder, RecorderUnavailable
from proxy.recording.format import REQUEST_BODY

log = logging.getLogger("sluice.recording")


#: Refusals that are somebody's decision (a person, a deadline, the agent leaving).
DECIDED = frozenset({"denied", "expired", "withdrawn"})


def decision_fields(decision: Decision, label: str) -> dict[str, Any]:
    """A decision record's fields (with who decided, when a person did)."""
    return {
        "action": label,
        "rule": decision.rule,
        "reason": decision.reason,
        "code": decision.code,
        **(decision.approval or {}),
    }


class RecordingRefused(Exception):
    """The recorder cannot write: the caller must refuse the request."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Capture:
    """The bytes the agent received, kept up to ``limit`` for the response record."""

    __slots__ = ("data", "limit", "size", "spans")

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.size = 0
        self.spans: list[Any] = []

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)

    def body_fields(self) -> dict[str, Any]:
        """The record fields for what was kept: the bytes, and where they were cut."""
        fields: dict[str, Any] = {"body": bytes(self.data)}
        if self.truncated:
            fields["body_truncated_at"] = len(self.data)
            fields["body_size"] = self.size
        return fields


class RecordingTap:
    def __init__(self, recorder: Recorder | None, bus: EventBus, capture_limit: int) -> None:
        self.recorder = recorder
        self.bus = bus
        self.capture_limit = capture_limit
        self._sessions: OrderedDict[str, None] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.recorder is not None

    def capture(self) -> Capture | None:
        return Capture(self.capture_limit) if self.recorder is not None else None

    async def request(
        self,
        *,
        identity: Identity,
        request_id: str,
        method: str,
        target: str | None,
        url: str,
        agent_url: str,
        client: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | None,
        streamed: bool,
        decision: dict[str, Any],
        secret_values: list[str],
    ) -> None:
        """Session start (first time), request and decision: durable before forwarding."""
        recorder = self.recorder
        if recorder is None:
            return
        fields: dict[str, Any] = {
            "request_id": request_id,
            "session": identity.session,
            "method": method,
            "target": target,
            "url": url,
            "agent_url": agent_url,  # absolute, as the agent asked (HAR needs one)
            "client": client,
            "headers": headers,  # the recorder copies (and redacts) them
            "secret_values": secret_values,
        }
        if body is not None:
            fields["body"] = body
        elif streamed:
            fields["body_streamed"] = True  # its bytes follow in a request.body record
            # (written after forwarding: a streamed body is not held back for the disk)
        try:
            if identity.session not in self._sessions:
                recorder.post(
                    "session.start",
                    session=identity.session,
                    subject=identity.subject,
                    groups=list(identity.groups),
                    token_id=identity.token_id,
                )
                self._sessions[identity.session] = None
                while len(self._sessions) > 10000:
                    self._sessions.popitem(last=False)
            # The request record carries its decision: one record fewer per request.
            # Records are written in order, so this one durable means the session's start
            # is too, and a failure to write either fails this one.
            await recorder.submit("request", **fields, **decision)
        except RecorderUnavailable as exc:
            raise RecordingRefused(str(exc)) from None

    async def decision(self, *, request_id: str, session: str, decision: dict[str, Any]) -> None:
        """A later decision on a recorded request (a person's, after a hold): durable
        before the request goes on, like the first."""
        if self.recorder is None:
            return
        try:
            await self.recorder.submit(
                "decision", request_id=request_id, session=session, **decision
            )
        except RecorderUnavailable as exc:
            raise RecordingRefused(str(exc)) from None

    def response(
        self,
        *,
        request_id: str,
        session: str,
        status: int,
        headers: Iterable[tuple[str, str]],
        capture: Capture | None,
        error: str | None = None,
        duration_ms: float | None = None,
    ) -> None:
        """After the agent has its answer: written in the background, never delaying it."""
        if self.recorder is None:
            return
        fields: dict[str, Any] = {
            "request_id": request_id,
            "session": session,
            "status": status,
            "headers": headers,  # the recorder copies (and redacts) them
        }
        if capture is not None:
            fields.update(capture.body_fields())
            fields["mask_spans"] = capture.spans  # the recorder turns Spans into dicts
        if duration_ms is not None:
            fields["duration_ms"] = duration_ms  # from the request's arrival to its last byte
        if error:
            fields["error"] = error
        self._submit("response", fields)

    def answered(
        self,
        *,
        request_id: str,
        session: str,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        error: str | None = None,
    ) -> None:
        """An answer Sluice wrote itself (a denial, a refusal): recorded as the response."""
        capture = self.capture()
        if capture is not None:
            capture.add(body)
        self.response(
            request_id=request_id,
            session=session,
            status=status,
            headers=headers,
            capture=capture,
            error=error,
        )

    def refused(
        self,
        *,
        request_id: str,
        session: str | None,
        recorded: bool,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        decision: str,
        error: str,
        reason: str,
    ) -> None:
        """A refusal: the response of a request already recorded (a person's or a
        deadline's denial is an answer, not a failure), else an error record of its own."""
        if recorded and session is not None:
            failure = None if decision in DECIDED else error
            self.answered(
                request_id=request_id,
                session=session,
                status=status,
                headers=headers,
                body=body,
                error=failure,
            )
        else:
            self.note(
                "error",
                request_id=request_id,
                session=session,
                status=status,
                error=error,
                reason=reason,
            )

    def request_body(self, *, request_id: str, session: str, sent: Capture) -> None:
        """A body streamed to the upstream unread by policy: recorded once it has gone."""
        if self.recorder is None:
            return
        self._submit(
            REQUEST_BODY, {"request_id": request_id, "session": session, **sent.body_fields()}
        )

    def note(self, kind: str, **fields: Any) -> None:
        """Config reloads and errors, recorded in the background."""
        if self.recorder is not None:
            self._submit(kind, fields)

    def _submit(self, kind: str, fields: dict[str, Any]) -> None:
        """Queued for the next group commit; failures are logged, never raised at the agent."""
        assert self.recorder is not None
        try:
            self.recorder.post(kind, urgent=False, **fields)
        except RecorderUnavailable as exc:
            log.warning("recording a %s record failed: %s", kind, exc)
            return
        except Exception as exc:  # a value JSON cannot hold: the caller must not fail
            log.warning("recording a %s record failed: %s", kind, type(exc).__name__)

    async def flush(self) -> None:
        """Until every record queued so far is durable (or the recorder has failed)."""
        if self.recorder is not None:
            await self.recorder.flush()
