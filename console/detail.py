"""The detail pane: one flow's request, decision, response, masked regions and bodies.

What events carry is drawn at once; headers and bodies come from a ``DetailSource`` (the
proxy's admin API, which reads them off the recording) when the flow has finished. Bodies
are drawn by ``highlight_body`` with masked regions in their own style.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from console.flow_detail import BodyView, FlowDetail
from console.model import Flow
from console.render import (
    MASK_STYLE,
    STYLES,
    decision_label,
    highlight_body,
    human_duration,
    human_size,
    plain,
)

LABEL = Style(bold=True, color="bright_blue")
DIM = Style(dim=True)


def _line(label: str, *parts: tuple[object, Style | str] | object) -> Text:
    """A labelled line; every part is plain text (never markup)."""
    text = Text(no_wrap=False)
    text.append(f"{label:<11}", LABEL)
    for part in parts:
        if isinstance(part, tuple):
            value, style = part
            text.append(plain(value), style)
        else:
            text.append(plain(part))
    return text


def describe_flow(
    flow: Flow,
    *,
    clock: Callable[[float], str] | None = None,
    detail: FlowDetail | None = None,
    bodies: bool = True,
) -> list[RenderableType]:
    """Everything the pane shows for ``flow``, as renderables (testable without an app).

    ``bodies=False`` stops before headers and bodies (replay draws its own from the file).
    """
    get = flow.get
    stamp = clock or (lambda ts: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)))
    started = get("started")
    target = f"{get('path', '')}" + (f"?{get('query')}" if get("query") else "")
    out: list[RenderableType] = [
        _line(
            "REQUEST",
            (get("method", ""), "bold"),
            " ",
            (get("target", "-"), STYLES["target"]),
            " ",
            (target, ""),
        ),
        _line(
            "",
            ("id ", DIM),
            get("request_id", ""),
            ("  at ", DIM),
            stamp(started) if isinstance(started, int | float) else "?",
            ("  from ", DIM),
            get("client") or "?",
            ("  host ", DIM),
            get("host") or "?",
        ),
        _line(
            "WHO",
            (get("subject") or "-", STYLES["who"]),
            ("  session ", DIM),
            get("session") or "-",
            ("  groups ", DIM),
            ", ".join(str(g) for g in get("groups") or ()) or "-",
        ),
    ]
    label, kind = decision_label(flow)
    out.append(
        _line("DECISION", (label, STYLES.get(kind, Style())), ("  rule ", DIM), get("rule") or "-")
    )
    if get("reason"):
        out.append(_line("", ("reason ", DIM), get("reason")))
    if get("approval_id"):
        out.append(
            _line(
                "APPROVAL",
                get("approval_id"),
                ("  ", DIM),
                (get("approval_state") or "pending", "bold"),
                ("  by ", DIM),
                get("decided_by") or "-",
                ("  scope ", DIM),
                get("approval_scope") or "-",
            )
        )
        if get("decision_reason"):
            out.append(_line("", ("said ", DIM), get("decision_reason")))
        if get("learned_rule"):
            out.append(_line("", ("learned rule ", DIM), get("learned_rule")))
    status = get("status")
    out.append(
        _line(
            "RESPONSE",
            (status if status is not None else "-", STYLES.get(str(status or " ")[0], Style())),
            ("  ", DIM),
            human_size(get("bytes_out")) or "-",
            ("  total ", DIM),
            human_duration(get("duration_ms")) or "-",
            ("  upstream ", DIM),
            human_duration(get("upstream_ms")) or "-",
            ("  state ", DIM),
            get("state") or "-",
        )
    )
    if get("error"):
        out.append(_line("", ("error ", STYLES["failed"]), get("error")))
    out.extend(masked_regions(get("mask_spans") or [], get("masked") or 0))
    if bodies:
        out.extend(_bodies(flow, detail))
    return out


def _bodies(flow: Flow, detail: FlowDetail | None) -> list[RenderableType]:
    get = flow.get
    out: list[RenderableType] = []
    finished = get("state") in ("completed", "failed") and get("status") is not None
    if detail is None:
        preview = get("preview")
        if preview:
            out.append(_line("REQ BODY", ("masked, as the approver saw it", DIM)))
            out.append(highlight_body(str(preview)))
        if finished:
            out.append(_line("BODIES", ("loading…", DIM)))
        return out
    if detail.unavailable:
        return [_line("BODIES", ("not available: ", DIM), detail.unavailable)]
    # bodies first, as in replay: the pane is short and they are what one looks for
    out.extend(_body("REQ BODY", detail.request_body, "as the agent sent it; secrets masked"))
    out.extend(_body("RESP BODY", detail.response_body, "masked, as the agent received it"))
    out.extend(_headers("REQ HEAD", detail.request_headers))
    out.extend(_headers("RESP HEAD", detail.response_headers))
    return out


def _headers(label: str, pairs: list[tuple[str, str]]) -> list[RenderableType]:
    if not pairs:
        return [_line(label, ("none", DIM))]
    return [_line(label if n == 0 else "", (f"{k}: ", DIM), v) for n, (k, v) in enumerate(pairs)]


def _body(label: str, body: BodyView | None, note: str) -> list[RenderableType]:
    if body is None or (not body.data and not body.size):
        return [_line(label, ("none", DIM))]
    parts: list[tuple[object, Style | str] | object] = [(note, DIM)]
    if body.spans:
        rules = ", ".join(sorted({str(s.get("rule", "?")) for s in body.spans}))
        parts.append((f"  {len(body.spans)} masked ({rules})", MASK_STYLE))
    if body.recorded_size is not None:
        parts.append((f"  recorded {body.size} of {body.recorded_size} bytes", DIM))
    elif body.truncated:
        parts.append((f"  first {len(body.data)} of {body.size} bytes", DIM))
    return [_line(label, *parts), highlight_body(body.data, body.spans)]


def masked_regions(spans: list[dict[str, Any]], count: int) -> list[RenderableType]:
    """The masked regions table: where, which rule, and the keyed fingerprint."""
    if not count and not spans:
        return []
    out: list[RenderableType] = [
        _line(
            "MASKED", (f"{count or len(spans)} region(s)", MASK_STYLE), ("  in the response", DIM)
        )
    ]
    if spans:
        table = Table(box=None, padding=(0, 1), show_header=True, header_style=DIM)
        table.add_column("bytes", justify="right")
        table.add_column("rule")
        table.add_column("fingerprint")
        for span in spans:
            table.add_row(
                Text(f"{span.get('start', '?')}-{span.get('end', '?')}"),
                Text(plain(span.get("rule", "?")), style="magenta"),
                Text(plain(span.get("fingerprint", "?")), style=DIM),
            )
        out.append(table)
    if count > len(spans):
        out.append(_line("", (f"{count - len(spans)} more not listed in the event", DIM)))
    return out


class DetailPane(VerticalScroll):
    """Shows the selected flow; redraws only when the flow changed (version)."""

    DEFAULT_CSS = """
    DetailPane { height: 14; border-top: solid $primary; padding: 0 1; background: $panel; }
    DetailPane.-hidden { display: none; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: tuple[int, int, int] | None = None
        self.clock: Callable[[float], str] | None = None

    def compose(self):  # type: ignore[no-untyped-def]
        yield Static(Text("No flow selected.", style=DIM), id="detail-body")

    def show(self, flow: Flow | None, *, detail: FlowDetail | None = None) -> None:
        """Draw ``flow`` (with headers and bodies once its source had them)."""
        key = (flow.n, flow.version, id(detail)) if flow is not None else None
        if key == self._shown:
            return
        self._shown = key
        body = self.query_one("#detail-body", Static)
        if flow is None:
            body.update(Text("No flow selected.", style=DIM))
            return
        body.update(
            Group(
                *describe_flow(
                    flow,
                    clock=self.clock,
                    detail=detail,
                )
            )
        )
