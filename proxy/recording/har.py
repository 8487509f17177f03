"""HAR 1.2 export of recorded flows, for browser devtools and HAR viewers.

Bodies are exported as recorded: response bodies are the masked bytes the agent got;
credential headers stay ``[REDACTED]``. Binary bodies are base64 (``encoding``). What HAR
has no field for (decisions, mask spans, seqs) goes under ``_sluice`` (HAR allows custom
fields that start with an underscore).
"""

from __future__ import annotations

import base64
import http
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from proxy.recording.reader import Flow, Recording

CREATOR = {"name": "sluice", "version": "0.1.0"}
_DECISION_KEYS = (
    "action",
    "rule",
    "reason",
    "approval_id",
    "approver",
    "scope",
    "held_ms",
    "ts",
    "seq",
)


def _iso(ts: float) -> str:
    moment = datetime.fromtimestamp(ts, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _headers(record: dict[str, Any] | None) -> list[dict[str, str]]:
    pairs = (record or {}).get("headers") or []
    return [{"name": str(name), "value": str(value)} for name, value in pairs]


def _header(record: dict[str, Any] | None, name: str) -> str | None:
    for header in _headers(record):
        if header["name"].lower() == name:
            return header["value"]
    return None


def _text(data: bytes) -> tuple[str, str | None]:
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return base64.b64encode(data).decode("ascii"), "base64"


def _status_text(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _body_note(record: dict[str, Any] | None) -> str | None:
    record = record or {}
    body = record.get("body") or {}
    if body.get("truncated"):
        return f"body truncated by the recorder: {body.get('kept')} of {body.get('size')} bytes"
    if record.get("body_truncated_at") is not None:
        return (
            f"body truncated at capture_limit: {record['body_truncated_at']} of "
            f"{record.get('body_size')} bytes recorded"
        )
    return None


def _size(record: dict[str, Any] | None, kept: int) -> int:
    """The body's real size: a capture cut at capture_limit knows what it left out."""
    size = (record or {}).get("body_size")
    return int(size) if isinstance(size, int) else kept


def _absolute_url(request: dict[str, Any]) -> str:
    """HAR wants an absolute URL: the one the agent asked, else one rebuilt from Host."""
    url = str(request.get("url") or "/")
    if request.get("method") == "CONNECT":  # a tunnel's authority, host:port
        return f"https://{url}/"
    if isinstance(request.get("agent_url"), str):
        return str(request["agent_url"])
    if urlsplit(url).scheme:
        return url
    host = _header(request, "host") or "sluice.invalid"
    target = request.get("target")
    prefix = f"/{target}" if target else ""
    return f"http://{host}{prefix}{url if url.startswith('/') else '/' + url}"


def entry(recording: Recording, flow: Flow) -> dict[str, Any]:
    """One HAR entry for one recorded request."""
    request, response = flow.request or {}, flow.response
    url = _absolute_url(request)
    started = float(request.get("ts") or (response or {}).get("ts") or 0.0)
    request_body = recording.body(flow, "request") if flow.request else b""
    sent = flow.request_body if "body" not in request else None
    har_request: dict[str, Any] = {
        "method": str(request.get("method") or "GET"),
        "url": url,
        "httpVersion": "HTTP/1.1",
        "cookies": [],
        "headers": _headers(request),
        "queryString": [{"name": k, "value": v} for k, v in parse_qsl(urlsplit(url).query, True)],
        "headersSize": -1,
        "bodySize": _size(sent, len(request_body)) if request_body else 0,
    }
    if request_body:
        text, encoding = _text(request_body)
        post = {"mimeType": _header(request, "content-type") or "", "text": text}
        notes = ["base64-encoded binary body"] if encoding else []
        if note := _body_note(sent or request):
            notes.append(note)
        if notes:
            post["comment"] = "; ".join(notes)
        har_request["postData"] = post
    wait = 0.0
    if response is not None:
        body = recording.body(flow, "response")
        text, encoding = _text(body)
        content: dict[str, Any] = {
            "size": _size(response, len(body)),
            "mimeType": _header(response, "content-type") or "application/octet-stream",
            "text": text,
        }
        if encoding:
            content["encoding"] = encoding
        if note := _body_note(response):
            content["comment"] = note
        status = int(response.get("status") or 0)
        har_response: dict[str, Any] = {
            "status": status,
            "statusText": _status_text(status),
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": _headers(response),
            "content": content,
            "redirectURL": _header(response, "location") or "",
            "headersSize": -1,
            "bodySize": len(body),
        }
        wait = max(0.0, (float(response.get("ts") or started) - started) * 1000.0)
    else:
        har_response = {
            "status": 0,
            "statusText": "",
            "httpVersion": "HTTP/1.1",
            "cookies": [],
            "headers": [],
            "content": {"size": 0, "mimeType": "x-unknown"},
            "redirectURL": "",
            "headersSize": -1,
            "bodySize": -1,
            "_error": "no response recorded",
        }
    return {
        "startedDateTime": _iso(started),
        "time": round(wait, 3),
        "request": har_request,
        "response": har_response,
        "cache": {},
        "timings": {
            "blocked": -1,
            "dns": -1,
            "connect": -1,
            "ssl": -1,
            "send": 0,
            "wait": round(wait, 3),
            "receive": 0,
        },
        "_sluice": {
            "request_id": flow.request_id,
            "session": flow.session,
            "decisions": [
                {key: d[key] for key in _DECISION_KEYS if key in d} for d in flow.decisions
            ],
            "mask_spans": (response or {}).get("mask_spans") or [],
            "errors": [{"seq": e.get("seq"), "reason": e.get("reason")} for e in flow.errors],
        },
    }


def build_har(recording: Recording, flows: Iterable[Flow]) -> dict[str, Any]:
    entries = [entry(recording, flow) for flow in flows if flow.request or flow.response]
    entries.sort(key=lambda item: item["startedDateTime"])
    return {"log": {"version": "1.2", "creator": dict(CREATOR), "entries": entries}}
