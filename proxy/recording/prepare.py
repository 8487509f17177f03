"""What a caller's fields become before they are chained: redacted, normalised, bodies encoded.

Redaction happens here, inside the recorder, so no caller can forget it: credential
headers (``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie``, the
recorder's configured names and the per-call ``injected`` names) become ``[REDACTED]``;
``secret_values`` (e.g. the raw injected token) are scrubbed from every header value and
from the URL and never stored. Bodies are bytes or str: inline text, base64, a truncated
prefix, or handed back to be stored as a sidecar blob. ``mask_spans`` (``Span`` objects
or dicts) become dicts, and a record with a ``request_id`` but no ``session`` gets the
session of that request's record.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Literal

from proxy.recording import format as fmt

_SESSION_MEMORY = 100_000
_STR_KEYS = ("session", "request_id", "action")


class FieldPreparer:
    def __init__(
        self,
        *,
        redact_headers: Iterable[str],
        max_inline_body: int,
        oversize: Literal["sidecar", "truncate"],
    ) -> None:
        self.redact_headers = frozenset(name.lower() for name in redact_headers)
        self._hidden = fmt.ALWAYS_REDACTED | self.redact_headers
        self.max_inline_body = max_inline_body
        self.oversize = oversize
        #: request_id -> session, so decisions and responses carry their session too.
        self._sessions: OrderedDict[str, str] = OrderedDict()

    def prepare(self, kind: str, fields: dict[str, Any]) -> tuple[dict[str, Any], bytes | None]:
        """``(fields ready to chain, body bytes to store as a blob or None)``."""
        fields = dict(fields)  # the caller's dict is theirs
        injected_names = fields.pop("injected", None)
        secret_values = fields.pop("secret_values", None)
        injected = [str(name).lower() for name in injected_names] if injected_names else []
        secrets = [str(value) for value in secret_values] if secret_values else []
        for key in _STR_KEYS:
            value = fields.get(key)
            if value is not None and type(value) is not str:
                fields[key] = str(value)
        status = fields.get("status")
        if status is not None and type(status) is not int:
            fields["status"] = int(status)
        self._link_session(kind, fields)
        if "headers" in fields:
            hidden = self._hidden.union(injected) if injected else self._hidden
            fields["headers"] = fmt.redact_headers(fields["headers"], hidden, secrets)
            if injected:
                fields["injected"] = sorted(set(injected))
        for name in ("url", "agent_url"):
            url = fields.get(name)
            if type(url) is str and (secrets or "@" in url):
                fields[name] = fmt.redact_url(url, secrets)
        spans = fields.get("mask_spans")
        if spans:
            fields["mask_spans"] = [
                span.as_dict() if hasattr(span, "as_dict") else dict(span) for span in spans
            ]
        elif spans is not None:
            fields["mask_spans"] = []
        body = fields.get("body")
        if body is None:
            return fields, None
        data = fmt.body_bytes_of(body)
        if len(data) <= self.max_inline_body:
            fields["body"] = fmt.inline_body(data)
        elif self.oversize == "truncate":
            fields["body"] = fmt.truncated_body(data, self.max_inline_body)
        else:
            return fields, data
        return fields, None

    def _link_session(self, kind: str, fields: dict[str, Any]) -> None:
        request_id, session = fields.get("request_id"), fields.get("session")
        if request_id is None:
            return
        if session is None and request_id in self._sessions:
            fields["session"] = self._sessions[request_id]
        elif session is not None and kind == fmt.REQUEST:
            self._sessions[request_id] = session
            while len(self._sessions) > _SESSION_MEMORY:
                self._sessions.popitem(last=False)
