"""A flow's headers and bodies, fetched from the proxy's admin API when a flow is shown.

Events carry no bodies; the proxy serves one flow at a time from its recording
(``GET /api/flows/<request_id>``), responses masked as the agent received them and request
bodies masked before they leave the proxy.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from console.client import AdminClient, AdminError, describe_error
from console.model import Flow


@dataclass(frozen=True)
class BodyView:
    data: bytes
    spans: list[dict[str, Any]] = field(default_factory=list)
    size: int = 0
    truncated: bool = False
    recorded_size: int | None = None

    @classmethod
    def from_admin(cls, doc: dict[str, Any]) -> BodyView:
        if isinstance(doc.get("text"), str):
            data = doc["text"].encode("utf-8", "surrogateescape")
        else:
            data = base64.b64decode(str(doc.get("base64") or ""))
        spans = [s for s in doc.get("mask_spans") or [] if isinstance(s, dict)]
        recorded = doc.get("recorded_size")
        return cls(
            data,
            spans,
            int(doc.get("size") or len(data)),
            bool(doc.get("truncated")),
            recorded if isinstance(recorded, int) else None,
        )


def _pairs(part: dict[str, Any] | None) -> list[tuple[str, str]]:
    pairs = (part or {}).get("headers") or []
    return [(str(p[0]), str(p[1])) for p in pairs if isinstance(p, list) and len(p) == 2]


@dataclass(frozen=True)
class FlowDetail:
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    request_body: BodyView | None = None
    response_body: BodyView | None = None
    #: Why there is nothing to show (the proxy does not record, the flow is gone, ...).
    unavailable: str | None = None

    @classmethod
    def from_admin(cls, doc: dict[str, Any]) -> FlowDetail:
        request = doc.get("request") if isinstance(doc.get("request"), dict) else None
        response = doc.get("response") if isinstance(doc.get("response"), dict) else None
        request_body = (request or {}).get("body")
        response_body = (response or {}).get("body")
        return cls(
            _pairs(request),
            _pairs(response),
            BodyView.from_admin(request_body) if isinstance(request_body, dict) else None,
            BodyView.from_admin(response_body) if isinstance(response_body, dict) else None,
        )


class DetailSource(Protocol):
    """Where the pane gets a flow's headers and bodies."""

    async def detail(self, flow: Flow) -> FlowDetail: ...


class AdminDetails:
    """The live source: the proxy's admin API, local or remote alike."""

    def __init__(self, client: AdminClient) -> None:
        self.client = client

    async def detail(self, flow: Flow) -> FlowDetail:
        request_id = str(flow.get("request_id") or "")
        if not request_id:
            return FlowDetail(unavailable="this flow has no request id")
        try:
            doc = await self.client.flow_detail(request_id)
        except AdminError as exc:
            return FlowDetail(unavailable=str(exc))
        except (aiohttp.ClientError, TimeoutError) as exc:
            return FlowDetail(unavailable=describe_error(exc))
        return FlowDetail.from_admin(doc)
