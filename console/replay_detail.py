"""The replay detail pane: the live pane's flow summary, plus what only a recording has.

On top of ``describe_flow`` (request, decision, approval, response, masked regions) it
shows the event under the playhead, an untrusted warning when verify found tampering at
or before this flow's records, the headers, and both bodies read from the recording with
masked regions highlighted; the selected region (``r`` cycles) in a second style with
its rule id and fingerprint. Bodies are drawn up to ``BODY_LIMIT`` bytes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.style import Style
from rich.text import Text
from textual.css.query import NoMatches
from textual.widgets import Static

from console.detail import DetailPane, describe_flow
from console.model import Flow
from console.render import MASK_STYLE, highlight_body, plain
from console.replay_model import Event, ReplayStore
from proxy.recording import Recording
from proxy.recording import format as fmt

BODY_LIMIT = 64 * 1024
JSON_LIMIT = 16 * 1024
LABEL = Style(bold=True, color="bright_blue")
DIM = Style(dim=True)
SELECTED_STYLE = Style(color="black", bgcolor="bright_yellow", bold=True, underline=True)
UNTRUSTED_STYLE = Style(color="white", bgcolor="red", bold=True)
SENT_STYLE = Style(color="white", bgcolor="dark_red", bold=True)


def line(label: str, *parts: tuple[object, Style | str] | object) -> Text:
    """A labelled line of plain text (never markup)."""
    text = Text()
    text.append(f"{label:<11}", LABEL)
    for part in parts:
        if isinstance(part, tuple):
            text.append(plain(part[0]), part[1])
        else:
            text.append(plain(part))
    return text


def stamp(ts: float, clock: Callable[[float], str] | None) -> str:
    if clock is not None:
        return clock(ts)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


def _char_at(raw: bytes, offset: int) -> int:
    return len(raw[: max(0, min(offset, len(raw)))].decode("utf-8", "replace"))


def body_text(
    raw: bytes, spans: Sequence[dict[str, Any]] = (), selected: int | None = None
) -> Text:
    """A body with masked regions in ``MASK_STYLE``, the selected one in its own style.

    Only a body that parses as JSON and is at most ``JSON_LIMIT`` bytes is syntax
    highlighted: a content type is not trusted (text labelled JSON gets one error token
    per character), and every token is a span the terminal has to draw.
    """
    shown = raw[:BODY_LIMIT]
    kept = [s for s in spans if isinstance(s.get("start"), int) and s["start"] < len(shown)]
    if len(shown) <= JSON_LIMIT:
        text = highlight_body(shown, kept)
    else:
        text = Text(plain(shown.decode("utf-8", "replace"), newlines=True).replace("\t", " "))
        for span in kept:
            start, end = _char_at(shown, span["start"]), _char_at(shown, int(span.get("end", 0)))
            text.stylize(MASK_STYLE, start, end)
    if selected is not None and 0 <= selected < len(spans) and spans[selected] in kept:
        span = spans[selected]
        start, end = _char_at(shown, span["start"]), _char_at(shown, int(span.get("end", 0)))
        text.stylize(SELECTED_STYLE, start, end)
    if len(raw) > len(shown):
        text.append(f"\n… {len(raw) - len(shown):,} more bytes (export HAR for all)", DIM)
    return text


def _headers(label: str, record: dict[str, Any]) -> list[RenderableType]:
    out: list[RenderableType] = []
    for n, pair in enumerate(record.get("headers") or []):
        name, value = (pair[0], pair[1]) if len(pair) == 2 else ("?", pair)
        out.append(line(label if n == 0 else "", (f"{name}: ", DIM), value))
    return out


def _body(
    label: str,
    recording: Recording,
    record: dict[str, Any],
    which: str,
    spans: Sequence[dict[str, Any]] = (),
    selected: int | None = None,
) -> list[RenderableType]:
    ref = record.get("body") or {}
    if not ref:
        note = "streamed; not recorded" if record.get("body_streamed") else "none"
        return [line(label, (note, DIM))]
    try:
        raw = recording.body(record, which)  # type: ignore[arg-type]
    except Exception as exc:  # a missing or altered sidecar must not break the pane
        return [line(label, ("unavailable: ", "red"), str(exc))]
    note = "masked, as the agent received it" if which == "response" else "as the agent sent it"
    if ref.get("truncated"):
        note += f"; truncated by the recorder: {ref.get('kept')} of {ref.get('size')} bytes"
    elif record.get("body_truncated_at") is not None:
        note += (
            f"; captured {record.get('body_truncated_at')} of {record.get('body_size')} bytes"
            " (capture_limit)"
        )
    out: list[RenderableType] = [line(label, (note, DIM))]
    if which == "request":
        found = outbound_secrets(raw[:BODY_LIMIT])
        if found:
            raw, spans = hide(raw, found), found
            rules = ", ".join(sorted({str(s["rule"]) for s in found}))
            out.append(
                line(
                    "",
                    (f" {len(found)} secret(s) the agent sent ({rules}) ", SENT_STYLE),
                    ("  hidden here; the recording and a HAR export hold them", DIM),
                )
            )
    out.append(body_text(raw, spans, selected))
    return out


@functools.lru_cache(maxsize=1)
def _masker() -> Any:
    from proxy.masking.engine import Masker

    return Masker(hmac_key=os.urandom(32))  # built-in rules; fingerprints are not shown


def outbound_secrets(raw: bytes) -> list[dict[str, Any]]:
    """Secrets in what the agent sent (recorded as sent): found with the built-in rules."""
    from proxy.masking.encodings import scan

    if not raw:
        return []
    try:
        return [{"start": s.start, "end": s.end, "rule": s.rule} for s in scan(_masker(), raw)]
    except Exception:  # the scan is a courtesy on screen; the body is shown regardless
        return []


def hide(raw: bytes, spans: Sequence[dict[str, Any]]) -> bytes:
    """The body with each span's bytes replaced by ``*`` (same length: offsets hold)."""
    data = bytearray(raw)
    for span in spans:
        data[span["start"] : span["end"]] = b"*" * (span["end"] - span["start"])
    return bytes(data)


def region_line(spans: Sequence[dict[str, Any]], selected: int) -> Text:
    span = spans[selected]
    return line(
        "REGION",
        (f" {selected + 1} of {len(spans)} ", SELECTED_STYLE),
        ("  bytes ", DIM),
        f"{span.get('start', '?')}-{span.get('end', '?')}",
        ("  rule ", DIM),
        (span.get("rule", "?"), Style(color="magenta", bold=True)),
        ("  fingerprint ", DIM),
        span.get("fingerprint", "?"),
        ("   (r: next region)", DIM),
    )


def describe_replay(
    flow: Flow,
    store: ReplayStore,
    recording: Recording,
    *,
    region: int = 0,
    clock: Callable[[float], str] | None = None,
    precise: Callable[[float], str] | None = None,
) -> list[RenderableType]:
    """Everything the replay pane shows for ``flow`` as of the playhead."""
    out: list[RenderableType] = []
    event: Event | None = store.current
    timeline = store.timeline
    if event is not None and event.request_id == flow.request_id:
        out.append(
            line(
                "EVENT",
                (f"seq {event.seq} ", "bold"),
                (event.kind, Style(color="yellow", bold=True)),
                ("  at ", DIM),
                stamp(event.ts, precise),
                ("  +", DIM),
                (f"{event.ts - timeline.start:.3f}s into the session", DIM),
            )
        )
    if store.untrusted(flow):
        out.append(
            line(
                "UNTRUSTED",
                (
                    f" recorded at or after seq {store.untrusted_from}, where verification "
                    "failed: these bytes may not be original ",
                    UNTRUSTED_STYLE,
                ),
            )
        )
    out.extend(describe_flow(flow, clock=clock, bodies=False))
    spans: list[dict[str, Any]] = list(flow.get("mask_spans") or [])
    selected = region % len(spans) if spans else None
    if selected is not None:
        out.append(region_line(spans, selected))
    request_id, upto = flow.request_id, store.position
    request = timeline.flow_event(request_id, fmt.REQUEST, upto)
    response = timeline.flow_event(request_id, fmt.RESPONSE, upto)
    streamed = timeline.flow_event(request_id, fmt.REQUEST_BODY, upto)
    request_record = recording.get(request.seq) if request is not None else None
    response_record = recording.get(response.seq) if response is not None else None
    if request_record is not None:
        body_record = request_record
        if streamed is not None and "body" not in request_record:
            body_record = recording.get(streamed.seq)  # a streamed body has its own record
        out.extend(_body("REQ BODY", recording, body_record, "request"))
    if response_record is not None:
        out.extend(_body("RESP BODY", recording, response_record, "response", spans, selected))
    if request_record is not None:
        out.extend(_headers("REQ HEAD", request_record))
    if response_record is not None:
        out.extend(_headers("RESP HEAD", response_record))
    return out


class ReplayDetail(DetailPane):
    """The live pane's widget, drawn from ``describe_replay`` instead."""

    items: list[RenderableType] = []  # what is shown (tests read it)

    def shows(self, key: tuple[Any, ...]) -> bool:
        """Whether the pane already shows what ``key`` names (skip rebuilding it)."""
        return key == self._shown

    def show_replay(self, key: tuple[Any, ...], items: list[RenderableType] | None) -> None:
        if key == self._shown:
            return
        self._shown = key  # type: ignore[assignment]
        self.items = items or []
        try:
            body = self.query_one("#detail-body", Static)
        except NoMatches:  # a worker finishing while the app shuts down
            return
        body.update(Group(*items) if items else Text("No flow selected.", style=DIM))
