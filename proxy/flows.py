"""Recent flows folded from lifecycle events: what ``/api/flows`` and consoles show.

A flow is one request's story (received, decided, forwarded, response, completed or
failed) as a flat dict. The table is bounded: the oldest flows fall out, they stay
in the recording.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from proxy.events import Event
from proxy.matcher import Facts

FLOW_EVENT_PREFIX = "request."


class FlowTable:
    def __init__(self, capacity: int = 2000) -> None:
        self.capacity = capacity
        self._flows: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def apply(self, event: Event) -> dict[str, Any] | None:
        """Fold one event in; returns the updated flow, or None for non-flow events."""
        request_id = event.data.get("request_id")
        if not request_id or not event.type.startswith(FLOW_EVENT_PREFIX):
            return None
        flow = self._flows.get(request_id)
        if flow is None:
            flow = {"request_id": request_id, "started": event.ts, "state": "received"}
            self._flows[request_id] = flow
            while len(self._flows) > self.capacity:
                self._flows.popitem(last=False)
        flow.update(event.data)
        flow["state"] = event.type.removeprefix(FLOW_EVENT_PREFIX)
        flow["seq"] = event.seq
        return flow

    def recent(self, limit: int = 100) -> list[dict[str, Any]]:
        flows = list(self._flows.values())
        return [dict(flow) for flow in flows[-limit:]] if limit > 0 else []

    def get(self, request_id: str) -> dict[str, Any] | None:
        flow = self._flows.get(request_id)
        return dict(flow) if flow is not None else None

    def __len__(self) -> int:
        return len(self._flows)


def flow_facts(flow: dict[str, Any]) -> Facts:
    """A flow as matcher facts, so console filters use the policy's matcher language."""
    return Facts(
        method=str(flow.get("method", "")),
        target=flow.get("target"),
        path=str(flow.get("path", "/")),
        query=str(flow.get("query", "")),
        host=str(flow.get("host", "")),
        port=flow.get("port") if isinstance(flow.get("port"), int) else None,
        subject=flow.get("subject"),
        status=flow.get("status"),
        decision=flow.get("decision"),
        rule=flow.get("rule"),
    )
