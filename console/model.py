"""What the console knows: flows folded from events, the filtered view, pending approvals.

Plain Python (no Textual), so the folding, the bounds and the filter are tested without a
terminal. Memory is bounded: at most ``max_flows`` flows are kept (the oldest go first),
each a slotted object whose repeated strings are shared.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, cast

from proxy.flows import FLOW_EVENT_PREFIX, flow_facts
from proxy.matcher import BodyNotLoaded, Matcher

DEFAULT_MAX_FLOWS = 100_000
#: Flows re-checked per step while a new filter is applied to everything held.
REBUILD_STEP = 10_000

_SLOTS = (
    "request_id",
    "started",
    "state",
    "method",
    "host",
    "client",
    "target",
    "path",
    "query",
    "subject",
    "groups",
    "session",
    "decision",
    "rule",
    "reason",
    "code",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_ms",
    "masked",
    "seq",
    "error",
    "decided_by",
    "approval_id",
    "approval_state",
)
_SLOT_SET = frozenset(_SLOTS)
#: Values repeated across many flows: stored once.
_SHARED = frozenset(
    {
        "method",
        "host",
        "client",
        "target",
        "subject",
        "session",
        "decision",
        "rule",
        "reason",
        "code",
        "state",
        "decided_by",
        "approval_state",
        "upstream",
    }
)
_interned: dict[Any, Any] = {}


def _share(value: Any) -> Any:
    if isinstance(value, list):
        value = tuple(value)
    if len(_interned) < 50_000:
        return _interned.setdefault(value, value)
    return _interned.get(value, value)


class Flow:
    """One request's story, as ``proxy.flows.FlowTable`` folds it, in a compact form.

    ``get`` makes it usable where a flow dict is expected (``flow_facts``).
    """

    __slots__ = (*_SLOTS, "extra", "n", "version", "shown", "denied_counted")

    def __init__(self, request_id: str, n: int, started: float) -> None:
        for name in _SLOTS:
            setattr(self, name, None)
        self.request_id = request_id
        self.started = started
        self.state = "received"
        self.extra: dict[str, Any] | None = None
        self.n = n  # arrival order: the view's sort key
        self.version = 0  # bumped on every change: row caches key on it
        self.shown = False  # currently in the (filtered) view
        self.denied_counted = False

    def get(self, key: str, default: Any = None) -> Any:
        if key in _SLOT_SET:
            value = getattr(self, key)
            return default if value is None else value
        return self.extra.get(key, default) if self.extra else default

    def update(self, data: dict[str, Any]) -> None:
        for key, value in data.items():
            if key in _SLOT_SET:
                setattr(self, key, _share(value) if key in _SHARED else value)
            elif key not in ("ts", "type"):
                if self.extra is None:
                    self.extra = {}
                self.extra[key] = value
        self.version += 1

    def as_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _SLOTS if getattr(self, name) is not None}
        data.update(self.extra or {})
        return data


class FlowStore:
    """Flows in arrival order, and the subset the current filter shows (both bounded)."""

    def __init__(self, max_flows: int = DEFAULT_MAX_FLOWS) -> None:
        self.max_flows = max(1, max_flows)
        self._by_id: dict[str, Flow] = {}
        self._order: list[Flow] = []
        self._head = 0
        self._visible: list[Flow] = []
        self._vhead = 0
        self._next_n = 0
        self.matcher: Matcher | None = None
        self._rebuild: list[Flow] | None = None
        self._rebuild_pos = 0
        self.seen_total = 0
        self.denied_total = 0
        self.dropped_total = 0
        self.changes = 0  # bumped whenever the view changed

    # -- reading ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._order) - self._head

    @property
    def visible_count(self) -> int:
        return len(self._visible) - self._vhead

    def visible(self, index: int) -> Flow:
        return self._visible[self._vhead + index]

    def visible_slice(self, start: int, stop: int) -> list[Flow]:
        return self._visible[self._vhead + start : self._vhead + stop]

    def index_of(self, flow: Flow) -> int:
        """The view position of ``flow``, or of the nearest flow after it (never past end)."""
        at = bisect.bisect_left(self._visible, flow.n, lo=self._vhead, key=_arrival)
        return min(at - self._vhead, max(0, self.visible_count - 1))

    def get(self, request_id: str) -> Flow | None:
        return self._by_id.get(request_id)

    def __iter__(self) -> Iterator[Flow]:
        return iter(self._order[self._head :])

    @property
    def rebuilding(self) -> bool:
        return self._rebuild is not None

    # -- folding events ---------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> Flow | None:
        """Fold one ``request.*`` event (the FlowTable rules); None for other events."""
        kind = str(event.get("type", ""))
        request_id = event.get("request_id")
        if not request_id or not kind.startswith(FLOW_EVENT_PREFIX):
            return None
        flow = self._by_id.get(request_id) or self._add(request_id, event.get("ts", 0.0))
        flow.update(event)
        flow.state = _share(kind.removeprefix(FLOW_EVENT_PREFIX))
        self._changed(flow)
        return flow

    def apply_approval(self, event: dict[str, Any]) -> Flow | None:
        """Note on the flow who held, approved or denied it (from ``approval.*`` events)."""
        flow = self._by_id.get(str(event.get("request_id", "")))
        if flow is None:
            return None
        flow.update(
            {
                "approval_id": event.get("id"),
                "approval_state": event.get("state"),
                "decided_by": event.get("decided_by"),
                "decision_reason": event.get("decision_reason"),
                "approval_scope": event.get("scope"),
                "learned_rule": event.get("learned_rule"),
                "preview": event.get("preview"),
                "approval_deadline": event.get("deadline"),
            }
        )
        self._changed(flow)
        return flow

    def merge_snapshot(self, flows: list[dict[str, Any]]) -> None:
        """Flows from ``/api/flows`` (first connect, or after a gap): newer facts win."""
        for data in flows:
            request_id = data.get("request_id")
            if not request_id:
                continue
            flow = self._by_id.get(request_id)
            if flow is not None and (flow.seq or 0) >= (data.get("seq") or 0):
                continue
            flow = flow or self._add(request_id, data.get("started", 0.0))
            flow.update(data)
            self._changed(flow)

    def _add(self, request_id: str, started: float) -> Flow:
        flow = Flow(request_id, self._next_n, started)
        self._next_n += 1
        self._by_id[request_id] = flow
        self._order.append(flow)
        self.seen_total += 1
        if len(self._order) - self._head > self.max_flows:
            self._trim()
        return flow

    def _trim(self) -> None:
        order, by_id = self._order, self._by_id
        while len(order) - self._head > self.max_flows:
            old = order[self._head]
            del by_id[old.request_id]
            self._head += 1
            self.dropped_total += 1
        if self._head > 4096 and self._head * 2 > len(order):
            del order[: self._head]
            self._rebuild_pos = max(0, self._rebuild_pos - self._head)
            self._head = 0
        first = order[self._head].n
        self._vhead = _drop_front(self._visible, self._vhead, first)
        if self._vhead > 4096 and self._vhead * 2 > len(self._visible):
            del self._visible[: self._vhead]
            self._vhead = 0
        self.changes += 1

    def _changed(self, flow: Flow) -> None:
        if not flow.denied_counted and flow.decision == "denied":
            flow.denied_counted = True
            self.denied_total += 1
        if self._rebuild is not None:
            if self._rebuild_pos < len(self._order) and flow.n >= self._order[self._rebuild_pos].n:
                return  # the rebuild reaches it later
            self._place(flow, self._rebuild, 0)
            return
        self._place(flow, self._visible, self._vhead)
        self.changes += 1

    def _place(self, flow: Flow, view: list[Flow], lo: int) -> None:
        wanted = self.matches(flow)
        if wanted == flow.shown:
            return
        flow.shown = wanted
        if wanted:
            if len(view) <= lo or view[-1].n < flow.n:
                view.append(flow)
            else:
                view.insert(bisect.bisect_left(view, flow.n, lo=lo, key=_arrival), flow)
            return
        at = bisect.bisect_left(view, flow.n, lo=lo, key=_arrival)
        if at < len(view) and view[at] is flow:
            del view[at]

    # -- filtering --------------------------------------------------------------------

    def matches(self, flow: Flow) -> bool:
        if self.matcher is None:
            return True
        try:
            return self.matcher.matches(flow_facts(cast(dict[str, Any], flow)))
        except BodyNotLoaded:
            return False  # the console holds no bodies: a body filter matches nothing

    def set_filter(self, matcher: Matcher | None) -> None:
        """Start re-checking every flow held; ``step()`` advances it between frames."""
        self.matcher = matcher
        self._rebuild = []
        self._rebuild_pos = self._head

    def step(self, budget: int = REBUILD_STEP) -> bool:
        """Advance a filter rebuild; True when the view was swapped in."""
        rebuild = self._rebuild
        if rebuild is None:
            return False
        order = self._order
        stop = min(len(order), self._rebuild_pos + budget)
        for index in range(self._rebuild_pos, stop):
            flow = order[index]
            flow.shown = self.matches(flow)
            if flow.shown:
                rebuild.append(flow)
        self._rebuild_pos = stop
        if stop < len(order):
            return False
        first = order[self._head].n if len(order) > self._head else 0
        self._visible, self._vhead = rebuild, _drop_front(rebuild, 0, first)
        self._rebuild = None
        self.changes += 1
        return True

    def finish_filter(self) -> None:
        while self._rebuild is not None:
            self.step(1 << 30)


def _arrival(flow: Flow) -> int:
    return flow.n


def _drop_front(view: list[Flow], head: int, first_live: int) -> int:
    """Advance ``head`` past flows dropped from the store (they are the oldest)."""
    if head < len(view) and view[head].n < first_live:
        head = bisect.bisect_left(view, first_live, lo=head, key=_arrival)
    return head


class Approvals:
    """The pending queue (oldest first) and recently closed approvals (bounded)."""

    def __init__(self, keep_closed: int = 500) -> None:
        self.pending: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.closed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.keep_closed = keep_closed

    def apply(self, event: dict[str, Any]) -> str | None:
        """Fold an ``approval.*`` event; returns its kind (``requested``, ``decided``...)."""
        kind = str(event.get("type", ""))
        approval_id = event.get("id")
        if not kind.startswith("approval.") or not isinstance(approval_id, str):
            return None
        summary = {k: v for k, v in event.items() if k not in ("type", "ts", "seq")}
        if kind == "approval.requested":
            if approval_id not in self.closed:
                self.pending[approval_id] = summary
        else:
            self.pending.pop(approval_id, None)
            self.closed[approval_id] = summary
            while len(self.closed) > self.keep_closed:
                self.closed.popitem(last=False)
        return kind.removeprefix("approval.")

    def replace(self, pending: list[dict[str, Any]]) -> None:
        """The proxy's own list (on connect): it is the truth."""
        self.pending = OrderedDict(
            (item["id"], item) for item in sorted(pending, key=lambda a: a.get("created", 0))
        )

    def oldest(self) -> dict[str, Any] | None:
        return next(iter(self.pending.values()), None)
