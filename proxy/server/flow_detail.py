"""One flow's headers and bodies for consoles, read back from the recording.

Events carry no bodies (they would flood every console); a console asks for the one flow
it shows. The answer comes from the recording, so it is exactly what was recorded: the
response masked as the agent received it. Request bodies are recorded as the agent sent
them, so they are masked here before they leave: a secret the agent tried to send must
not reach an approver's screen either.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy.masking.engine import Masker
from proxy.recording import Recording
from proxy.recording.reader import Flow

#: The most of one body a console is sent; the rest is marked cut.
BODY_LIMIT = 256 * 1024
_HEAD_FIELDS = ("seq", "ts", "method", "target", "url", "agent_url", "status", "error")
_DECISION_FIELDS = ("seq", "ts", "action", "rule", "reason", "code")


def _body(data: bytes, record: dict[str, Any] | None) -> dict[str, Any]:
    shown = data[:BODY_LIMIT]
    out: dict[str, Any] = {"size": len(data), "shown": len(shown)}
    try:
        out["text"] = shown.decode("utf-8")
    except UnicodeDecodeError:
        out["base64"] = base64.b64encode(shown).decode("ascii")
    cut = (record or {}).get("body_truncated_at")
    if cut is not None:  # the recording itself kept only a prefix (capture_limit)
        out["recorded_size"] = (record or {}).get("body_size")
    out["truncated"] = len(shown) < len(data) or cut is not None
    return out


def _part(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    part = {key: record[key] for key in _HEAD_FIELDS if key in record}
    part["headers"] = [list(pair) for pair in record.get("headers") or [] if len(pair) == 2]
    return part


def flow_of(recording: Recording, request_id: str, masker: Masker | None) -> dict[str, Any] | None:
    """The flow as recorded (None when the recording has no such request). Blocking."""
    flow: Flow | None = recording.flow(request_id)
    if flow is None or flow.request is None:
        return None
    request = _part(flow.request)
    assert request is not None
    sent = recording.body(flow, "request")
    spans: list[dict[str, object]] = []
    if sent and masker is not None:
        result = masker.mask_bytes(sent)
        sent, spans = result.masked, [span.as_dict() for span in result.spans]
    if sent or flow.request.get("body_streamed"):
        request["body"] = _body(sent, flow.request_body)
        request["body"]["mask_spans"] = spans
    response = _part(flow.response)
    if response is not None and flow.response is not None:
        response["body"] = _body(recording.body(flow, "response"), flow.response)
        response["body"]["mask_spans"] = list(flow.response.get("mask_spans") or [])
    return {
        "request_id": request_id,
        "session": flow.session,
        "request": request,
        "response": response,
        "decisions": [
            {key: d[key] for key in _DECISION_FIELDS if key in d} for d in flow.decisions
        ],
        "errors": [{"seq": e.get("seq"), "reason": e.get("reason")} for e in flow.errors],
    }


class FlowDetails:
    """Reads flows off the live recording in a thread: the proxy's loop never waits on it.

    The recording stays open between requests and is refreshed before each: only files
    that changed are re-indexed, so days of retained recordings cost a stat each.
    """

    def __init__(
        self,
        directory: Path,
        settle: Callable[[], Any],
        masker: Callable[[], Masker | None],
    ) -> None:
        self.directory = directory
        self._settle = settle
        self._masker = masker
        self._recording: Recording | None = None
        self._lock = threading.Lock()  # one reader at a time: the handles are shared

    async def detail(self, request_id: str) -> dict[str, Any] | None:
        await self._settle()  # records still on their way to the disk are written first
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._read, request_id, self._masker())

    def _read(self, request_id: str, masker: Masker | None) -> dict[str, Any] | None:
        with self._lock:
            if not self.directory.is_dir():
                return None
            if self._recording is None:
                self._recording = Recording.open(self.directory)
            else:
                self._recording.refresh()
            return flow_of(self._recording, request_id, masker)

    def close(self) -> None:
        with self._lock:
            if self._recording is not None:
                self._recording.close()
                self._recording = None
