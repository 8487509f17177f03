"""Turning untrusted flow data into cells: columns, labels, and bodies with masked regions.

Nothing here parses markup: every string from a proxy (paths, subjects, reasons, bodies)
is plain text placed in ``Segment``/``Text`` objects, with control characters replaced,
so ``/[/admin]/[bold]x`` shows exactly as it is.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.style import Style
from rich.syntax import Syntax
from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ALL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
REPLACEMENT = "\ufffd"

MASK_STYLE = Style(color="bright_white", bgcolor="dark_red", bold=True, underline=True)
STYLES: dict[str, Style] = {
    "time": Style(dim=True),
    "who": Style(color="cyan"),
    "method": Style(bold=True),
    "target": Style(color="blue"),
    "path": Style(),
    "size": Style(dim=True),
    "duration": Style(dim=True),
    "allowed": Style(color="green"),
    "masked": Style(color="magenta", bold=True),
    "denied": Style(color="red", bold=True),
    "held": Style(color="black", bgcolor="yellow", bold=True),
    "approved": Style(color="cyan", bold=True),
    "failed": Style(color="red"),
    "pending": Style(dim=True, italic=True),
    "other": Style(color="yellow"),
    "2": Style(color="green"),
    "3": Style(color="cyan"),
    "4": Style(color="yellow"),
    "5": Style(color="red", bold=True),
}


def plain(text: object, *, newlines: bool = False) -> str:
    """Untrusted text made safe to draw: control characters become U+FFFD (same length)."""
    value = "" if text is None else str(text)
    return (_CONTROL if newlines else _CONTROL_ALL).sub(REPLACEMENT, value)


def fit(text: str, width: int, align: str = "left") -> str:
    """Exactly ``width`` cells: cut with an ellipsis, or padded."""
    if width <= 0:
        return ""
    if text.isascii():
        if len(text) > width:
            return text[: width - 1] + "…"
        return text.rjust(width) if align == "right" else text.ljust(width)
    if cell_len(text) > width:
        out, used = [], 0
        for char in text:
            size = cell_len(char)
            if used + size > width - 1:
                break
            out.append(char)
            used += size
        text = "".join(out) + "…"
    pad = " " * max(0, width - cell_len(text))
    return pad + text if align == "right" else text + pad


@dataclass(frozen=True)
class Column:
    name: str
    title: str
    width: int
    align: str = "left"


def layout(width: int) -> list[Column]:
    """Column widths for a view ``width`` cells wide; the path takes what is left."""
    size = 0 if width < 90 else 1 if width < 110 else 2
    fixed = [
        Column("time", "TIME", 8),
        Column("who", "SUBJECT", (8, 10, 14)[size]),
        Column("method", "METHOD", 7),
        Column("target", "TARGET", (8, 8, 10)[size]),
        Column("path", "PATH", 0),
        Column("status", "STS", 3, "right"),
        Column("decision", "DECISION", (14, 18, 26)[size]),
        Column("size", "SIZE", 6, "right"),
        Column("duration", "DUR", 7, "right"),
    ]
    used = sum(column.width for column in fixed) + len(fixed) - 1
    path = max(8, width - used)
    return [Column(c.name, c.title, path) if c.name == "path" else c for c in fixed]


def human_size(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return ""
    size = float(value)
    for unit in ("B", "K", "M", "G"):
        if size < 1024 or unit == "G":
            return f"{int(size)}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return ""


def human_duration(value: object) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return ""
    if value < 1000:
        return f"{value:.0f}ms" if value >= 10 else f"{value:.1f}ms"
    return f"{value / 1000:.1f}s" if value < 60_000 else f"{value / 60_000:.1f}m"


def local_clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def utc_clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(ts))


def _by(flow: Any) -> str | None:
    by = flow.get("decided_by")
    if by:
        return str(by)
    reason = str(flow.get("reason") or "")
    for prefix in ("approved earlier by ", "approved by "):
        if reason.startswith(prefix):
            return reason.removeprefix(prefix)
    return None


def decision_label(flow: Any) -> tuple[str, str]:
    """The decision column: what happened and, where it matters, who or which rule."""
    decision = flow.get("decision")
    state = flow.get("state")
    masked = flow.get("masked") or 0
    if decision == "held" or (state == "held" and decision in (None, "held")):
        return "held for approval", "held"
    if decision == "approved":
        label = f"approved by {_by(flow) or '?'}"
        return (f"{label} · masked {masked}" if masked else label), "approved"
    if decision == "denied":
        by = flow.get("decided_by")
        if by:
            return f"denied by {by}", "denied"
        rule = flow.get("rule")
        return (f"denied {rule}" if rule else "denied"), "denied"
    if state == "failed":
        return f"failed {flow.get('upstream_error') or ''}".strip(), "failed"
    if decision == "allowed":
        return (f"masked {masked}", "masked") if masked else ("allowed", "allowed")
    if decision is None:
        return str(state or "received"), "pending"
    code = flow.get("code")
    return (f"{decision} {code}" if code and code != decision else str(decision)), "other"


def row_cells(flow: Any, clock: Callable[[float], str]) -> dict[str, tuple[str, str]]:
    """Each column's text and style name for one flow."""
    status = flow.get("status")
    label, kind = decision_label(flow)
    path = str(flow.get("path") or "")
    query = flow.get("query")
    if query:
        path = f"{path}?{query}"
    port = flow.get("port")
    if port is not None:  # a forward request: the destination is part of what it asked for
        host = str(flow.get("host") or "")
        path = f"{f'[{host}]' if ':' in host else host}:{port}{path}"
    started = flow.get("started")
    return {
        "time": (clock(started) if isinstance(started, int | float) else "", "time"),
        "who": (str(flow.get("subject") or flow.get("session") or "-"), "who"),
        "method": (str(flow.get("method") or ""), "method"),
        "target": (str(flow.get("target") or "-"), "target"),
        "path": (path, "path"),
        "status": (str(status) if status is not None else "", str(status or " ")[0]),
        "decision": (label, kind),
        "size": (human_size(flow.get("bytes_out")), "size"),
        "duration": (human_duration(flow.get("duration_ms")), "duration"),
    }


def header_text(columns: Iterable[Column]) -> Text:
    text = Text(no_wrap=True, overflow="crop")
    for index, column in enumerate(columns):
        if index:
            text.append(" ")
        text.append(fit(column.title, column.width, column.align), Style(bold=True, dim=True))
    return text


# -- bodies with masked regions ---------------------------------------------------------


def _char_offsets(raw: bytes, offsets: Iterable[int]) -> dict[int, int]:
    """Byte offsets (what the proxy records) as character offsets into the decoded text."""
    return {
        offset: len(raw[: max(0, min(offset, len(raw)))].decode("utf-8", "replace"))
        for offset in set(offsets)
    }


def looks_json(text: str, content_type: str = "") -> bool:
    if "json" in content_type.lower():
        return True
    stripped = text.lstrip()
    if not stripped.startswith(("{", "[")):
        return False
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def highlight_body(
    body: bytes | str, spans: Iterable[Mapping[str, Any]] = (), content_type: str = ""
) -> Text:
    """A body as ``Text``: JSON syntax-highlighted, masked regions in ``MASK_STYLE``.

    ``spans`` are the proxy's ``mask_spans`` (``start``/``end`` byte offsets, ``rule``).
    Same-length masking keeps them valid for the masked body the agent received.
    """
    raw = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body
    # one character per character, so offsets stay true (a tab becomes one space)
    text_value = plain(raw.decode("utf-8", "replace"), newlines=True).replace("\t", " ")
    spans = [span for span in spans if isinstance(span.get("start"), int)]
    if looks_json(text_value, content_type):
        text = Syntax(text_value, "json", theme="ansi_dark", background_color="default").highlight(
            text_value
        )
        text.rstrip()
    else:
        text = Text(text_value)
    text.no_wrap = False
    chars = _char_offsets(raw, [s["start"] for s in spans] + [int(s.get("end", 0)) for s in spans])
    for span in spans:
        start, end = chars[span["start"]], chars[int(span.get("end", 0))]
        if end > start:
            text.stylize(MASK_STYLE, start, end)
    return text
