"""A recorded session as a timeline: events in seq order, folded into console flows.

Plain Python (no Textual), so stepping, jumping and folding are tested without a
terminal. The timeline keeps slim copies of the records (bodies and headers dropped);
the detail pane reads full records from the recording only for the flow it shows.

The flow list shows the session *as it was at the playhead*: a flow appears once its
first record is behind the playhead and shows the state its records up to the playhead
give it. Moving the playhead re-folds only the flows whose records were passed over.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from console.model import Flow, FlowStore
from proxy.recording import format as fmt

CATEGORIES = ("denied", "held", "masked", "failed")
#: Dropped from the slim copies the timeline keeps (the detail pane re-reads them).
_HEAVY = frozenset({"body", "headers", "prev", "v", "preview", "secret_values"})
_FLOW_SLOTS = frozenset(Flow.__slots__) - {"extra", "n", "version", "shown", "denied_counted"}


@dataclass(frozen=True)
class SessionInfo:
    """Who the session was: from its ``session.start`` record (if it was recorded)."""

    id: str
    subject: str | None = None
    groups: tuple[str, ...] = ()
    token_id: str | None = None
    start: float | None = None


@dataclass(slots=True)
class Event:
    """One record of the session: its place in the timeline, and what it marks."""

    pos: int
    seq: int
    ts: float
    kind: str
    request_id: str | None
    data: dict[str, Any]
    tags: frozenset[str] = frozenset()


def body_size(ref: Mapping[str, Any] | None) -> int | None:
    """The size of a recorded body from its reference, without loading it."""
    if not ref:
        return None
    if isinstance(ref.get("size"), int):
        return int(ref["size"])
    if "text" in ref:
        return len(str(ref["text"]).encode("utf-8", "surrogateescape"))
    if "b64" in ref:
        text = str(ref["b64"])
        return len(text) * 3 // 4 - text.count("=")
    return None


def header_value(headers: Iterable[Any] | None, name: str) -> str | None:
    for pair in headers or ():
        if isinstance(pair, list | tuple) and len(pair) == 2 and str(pair[0]).lower() == name:
            return str(pair[1])
    return None


def slim(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the timeline keeps of a record; a few values derived from what it drops."""
    out = {key: value for key, value in record.items() if key not in _HEAVY}
    headers = record.get("headers")
    if headers:
        out["_host"] = header_value(headers, "host")
        out["_content_type"] = header_value(headers, "content-type")
    if "body" in record:
        out["_body_size"] = body_size(record.get("body"))
        out["_truncated"] = bool((record.get("body") or {}).get("truncated"))
    return out


def _tags(kind: str, data: Mapping[str, Any]) -> set[str]:
    tags: set[str] = set()
    decides = kind == fmt.DECISION or kind == fmt.REQUEST  # a request carries its decision
    if decides and data.get("action") in fmt.DENIED_ACTIONS:
        tags.add("denied")
    elif decides and data.get("action") in fmt.HELD_ACTIONS:
        tags.add("held")  # the request's first decision; approval records follow it
    elif kind == fmt.RESPONSE:
        if data.get("mask_spans"):
            tags.add("masked")
        status = data.get("status")
        if data.get("error") or (isinstance(status, int) and status >= 500):
            tags.add("failed")
    return tags


class Timeline:
    """The session's records in seq order, with indexes for jumps and time seeks."""

    def __init__(self, info: SessionInfo, events: list[Event]) -> None:
        self.info = info
        self.events = events
        self.by_flow: dict[str, list[int]] = {}
        for event in events:
            if event.request_id is not None:
                self.by_flow.setdefault(event.request_id, []).append(event.pos)
        self.tsmax = list(itertools.accumulate((e.ts for e in events), max))
        self.marks: dict[str, list[int]] = {name: [] for name in CATEGORIES}
        for event in events:
            for tag in event.tags:
                self.marks[tag].append(event.pos)

    @classmethod
    def build(cls, session: str, records: Iterable[Mapping[str, Any]]) -> Timeline:
        info = SessionInfo(session)
        events: list[Event] = []
        for record in sorted(records, key=lambda r: int(r.get("seq", 0))):
            kind = str(record.get("kind", ""))
            if kind == fmt.SESSION_START:
                info = SessionInfo(
                    session,
                    record.get("subject"),
                    tuple(str(g) for g in record.get("groups") or ()),
                    record.get("token_id"),
                    float(record.get("ts", 0.0)),
                )
            data = slim(record)
            rid = record.get("request_id")
            events.append(
                Event(
                    len(events),
                    int(record.get("seq", 0)),
                    float(record.get("ts", 0.0)),
                    kind,
                    str(rid) if rid is not None else None,
                    data,
                    frozenset(_tags(kind, data)),
                )
            )
        denied_flows = {e.request_id for e in events if "denied" in e.tags}
        for event in events:  # a refusal that is not part of a policy denial is a failure
            if event.kind == fmt.ERROR and event.request_id not in denied_flows:
                event.tags = event.tags | {"failed"}
        return cls(info, events)

    def __len__(self) -> int:
        return len(self.events)

    @property
    def flow_ids(self) -> list[str]:
        return list(self.by_flow)

    @property
    def start(self) -> float:
        return self.events[0].ts if self.events else 0.0

    @property
    def end(self) -> float:
        return self.tsmax[-1] if self.tsmax else 0.0

    def flow_events(self, request_id: str, upto: int | None = None) -> list[Event]:
        positions = self.by_flow.get(request_id, [])
        if upto is not None:
            positions = positions[: bisect.bisect_right(positions, upto)]
        return [self.events[pos] for pos in positions]

    def flow_event(self, request_id: str, kind: str, upto: int | None = None) -> Event | None:
        """The flow's first event of ``kind`` (up to position ``upto``), if any."""
        return next((e for e in self.flow_events(request_id, upto) if e.kind == kind), None)

    def first_pos(self, request_id: str) -> int:
        positions = self.by_flow.get(request_id)
        return positions[0] if positions else 1 << 62

    def last_seq(self, request_id: str) -> int:
        positions = self.by_flow.get(request_id)
        return self.events[positions[-1]].seq if positions else -1

    def next_mark(self, category: str, pos: int, direction: int) -> int | None:
        """The next (or previous) event of ``category`` strictly after (before) ``pos``."""
        marks = self.marks[category]
        if direction > 0:
            at = bisect.bisect_right(marks, pos)
            return marks[at] if at < len(marks) else None
        at = bisect.bisect_left(marks, pos) - 1
        return marks[at] if at >= 0 else None

    def count_upto(self, category: str, pos: int) -> int:
        return bisect.bisect_right(self.marks[category], pos)

    def at_time(self, ts: float) -> int:
        """The last event at or before ``ts`` (-1: before the first one)."""
        return bisect.bisect_right(self.tsmax, ts) - 1

    def pos_of_seq(self, seq: int) -> int:
        """The last event with a seq at or below ``seq``."""
        return bisect.bisect_right([e.seq for e in self.events], seq) - 1


def fold(events: Sequence[Event], info: SessionInfo) -> dict[str, Any]:
    """One flow's fields (the live view's vocabulary) from its records so far."""
    data: dict[str, Any] = {
        "session": info.id,
        "subject": info.subject,
        "groups": info.groups,
        "state": "received",
        "started": events[0].ts,
        "first_seq": events[0].seq,
    }
    for event in events:
        r = event.data
        kind = event.kind
        if kind == fmt.REQUEST:
            raw_path, _, query = str(r.get("url") or "/").partition("?")
            data.update(
                method=r.get("method"),
                target=r.get("target"),
                path=unquote(raw_path),
                query=query,
                host=r.get("_host"),
                client=r.get("client") or None,
                bytes_in=r.get("_body_size"),
            )
            if r.get("action") is not None:  # the first decision, in the request record
                data.update(_decided(r))
        elif kind == fmt.DECISION:
            data.update(_decided(r))
        elif kind == "approval.requested":
            for key in ("method", "target", "path", "query"):
                data.setdefault(key, r.get(key))
            data.update(
                decision="held",
                state="held",
                rule=r.get("rule"),
                reason=r.get("reason"),
                approval_id=r.get("id"),
                approval_state="pending",
            )
        elif kind.startswith("approval."):
            data.update(
                approval_id=r.get("id"),
                approval_state=r.get("state") or kind.removeprefix("approval."),
                decided_by=r.get("decided_by"),
                decision_reason=r.get("decision_reason"),
                approval_scope=r.get("scope"),
                learned_rule=r.get("learned_rule"),
            )
        elif kind == fmt.RESPONSE:
            spans = r.get("mask_spans") or []
            data.update(
                status=r.get("status"),
                bytes_out=r.get("body_size", r.get("_body_size")),
                masked=len(spans),
                mask_spans=spans,
                duration_ms=round((event.ts - data["started"]) * 1000, 3),
                state="failed" if "failed" in event.tags else "completed",
            )
        elif kind == fmt.ERROR:
            data.update(
                status=r.get("status"),
                code=r.get("error"),
                duration_ms=round((event.ts - data["started"]) * 1000, 3),
                state="failed" if "failed" in event.tags else "completed",
            )
            data.setdefault("decision", "refused")
            if not data.get("reason"):
                data["reason"] = r.get("reason")
        data["seq"] = event.seq
    return data


def _decided(r: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "decision": r.get("action"),
        "rule": r.get("rule"),
        "reason": r.get("reason"),
        "code": r.get("code"),
        "state": "held" if r.get("action") in fmt.HELD_ACTIONS else "decided",
    }


class ReplayStore(FlowStore):
    """Every flow of the session, each folded up to the playhead; later ones hidden."""

    def __init__(self, timeline: Timeline) -> None:
        super().__init__(len(timeline.by_flow) + 1)
        self.timeline = timeline
        self.position = -1
        self.search_hits: set[str] | None = None
        #: Records at or after this seq may not be original (verify found tampering).
        self.untrusted_from: int | None = None
        for request_id in sorted(timeline.by_flow, key=timeline.first_pos):
            self._add(request_id, timeline.events[timeline.first_pos(request_id)].ts)

    def begun(self, flow: Flow) -> bool:
        return self.timeline.first_pos(flow.request_id) <= self.position

    def untrusted(self, flow: Flow) -> bool:
        limit = self.untrusted_from
        return limit is not None and self.timeline.last_seq(flow.request_id) >= limit

    def matches(self, flow: Flow) -> bool:
        if not self.begun(flow):
            return False
        if self.search_hits is not None and flow.request_id not in self.search_hits:
            return False
        return super().matches(flow)

    @property
    def current(self) -> Event | None:
        events = self.timeline.events
        return events[self.position] if 0 <= self.position < len(events) else None

    def current_flow(self) -> Flow | None:
        event = self.current
        return self.get(event.request_id) if event and event.request_id else None

    def move_to(self, position: int) -> bool:
        """Put the playhead on event ``position`` (-1: before the first); True if it moved."""
        position = max(-1, min(position, len(self.timeline) - 1))
        if position == self.position:
            return False
        self.finish_filter()
        low, high = sorted((self.position, position))
        passed = self.timeline.events[low + 1 : high + 1]
        self.position = position
        for request_id in dict.fromkeys(e.request_id for e in passed if e.request_id):
            flow = self.get(request_id)
            if flow is not None:
                self.refold(flow)
                self._changed(flow)
        self.changes += 1
        return True

    def refold(self, flow: Flow) -> None:
        for name in _FLOW_SLOTS - {"request_id", "started"}:
            setattr(flow, name, None)
        flow.extra = None
        events = self.timeline.flow_events(flow.request_id, self.position)
        flow.update(fold(events, self.timeline.info) if events else {"state": "received"})

    def set_search(self, hits: set[str] | None) -> None:
        self.search_hits = hits
        self.set_filter(self.matcher)
        self.finish_filter()

    def apply_filter(self, matcher: Any) -> None:
        self.set_filter(matcher)
        self.finish_filter()

    def tally(self) -> dict[str, int]:
        """Events of each category up to the playhead."""
        return {name: self.timeline.count_upto(name, self.position) for name in CATEGORIES}


@dataclass
class Integrity:
    """What ``verify`` said about the files holding a session, as the banner needs it."""

    state: str  # checking / verified / repaired tail / unsigned / torn tail / tampered / error
    first_bad_seq: int | None = None
    unsigned_from: int | None = None
    reason: str | None = None
    key_ids: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)

    @property
    def untrusted_from(self) -> int | None:
        return self.first_bad_seq if self.state in ("tampered", "torn tail") else None


_SEVERITY = {"verified": 0, "repaired tail": 1, "unsigned": 2, "torn tail": 3, "tampered": 4}


def integrity_of(results: Sequence[Any], files: Iterable[str] | None = None) -> Integrity:
    """The worst state over the ``FileResult``s of ``files`` (all results if None)."""
    wanted = set(files) if files is not None else None
    chosen = [r for r in results if wanted is None or r.path.name in wanted]
    if not chosen:
        return Integrity("error", reason="no recording files were checked")
    worst = max(chosen, key=lambda r: _SEVERITY.get(r.state, 5))
    bad = [r.first_bad_seq for r in chosen if r.state in ("tampered", "torn tail")]
    unsigned = [r.unsigned_from for r in chosen if r.unsigned_from is not None]
    return Integrity(
        worst.state,
        first_bad_seq=min((s for s in bad if s is not None), default=None),
        unsigned_from=min(unsigned, default=None),
        reason=worst.reason,
        key_ids=sorted({k for r in chosen for k in r.key_ids}),
        details=[r.describe() for r in chosen],
    )
