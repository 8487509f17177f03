"""Finding things in a replayed session: content search, and seek targets typed by a person.

Search reads full records (bodies, headers) from a ``Recording`` the caller owns, so it
runs in a worker thread with its own reader. ``parse_seek`` turns "14:03:07", "+90",
"+1m30s" or "seq 120" into a playhead position.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from typing import Any

from console.replay_model import Timeline
from proxy.recording import format as fmt


def search_flows(recording: Any, timeline: Timeline, needle: str) -> set[str]:
    """Flows whose request or response URL, headers or body contain ``needle`` (any case)."""
    wanted = needle.lower().encode("utf-8", "surrogateescape")
    hits: set[str] = set()
    for request_id, positions in timeline.by_flow.items():
        for pos in positions:
            event = timeline.events[pos]
            if event.kind not in (fmt.REQUEST, fmt.RESPONSE, fmt.REQUEST_BODY):
                continue
            record = recording.get(event.seq)
            parts = [str(record.get("url") or "").encode("utf-8", "surrogateescape")]
            parts += [
                f"{pair[0]}: {pair[1]}".encode("utf-8", "surrogateescape")
                for pair in record.get("headers") or []
                if len(pair) == 2
            ]
            if record.get("body"):
                with contextlib.suppress(Exception):  # an unreadable sidecar: search the rest
                    which = fmt.RESPONSE if event.kind == fmt.RESPONSE else fmt.REQUEST
                    parts.append(recording.body(record, which))
            if any(wanted in part.lower() for part in parts):
                hits.add(request_id)
                break
    return hits


_OFFSET = re.compile(
    r"^\+?\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m(?!s))?\s*"
    r"(?:(\d+(?:\.\d+)?)s?)?\s*(?:(\d+)ms)?$"
)


def parse_seek(text: str, timeline: Timeline, *, utc: bool = False) -> int:
    """A playhead position from what a person types; ValueError says what was wrong.

    ``seq 120`` or ``#120``; ``+90``, ``+1m30s`` or ``+250ms`` from the session start;
    ``14:03:07`` (clock time on the session's first day, as the view shows times);
    ``2026-01-01T14:03:07``; or a Unix timestamp.
    """
    value = text.strip()
    if not value:
        raise ValueError("type a time, +offset, or seq N")
    if not timeline.events:
        raise ValueError("the session has no events")
    lowered = value.lower()
    if lowered.startswith(("seq", "#")):
        number = lowered.removeprefix("seq").removeprefix("#").strip()
        if not number.isdigit():
            raise ValueError(f"not a seq number: {value!r}")
        return timeline.pos_of_seq(int(number))
    zone = dt.UTC if utc else None
    if value.startswith("+"):
        match = _OFFSET.match(value)
        if not match or not any(match.groups()):
            raise ValueError(f"not an offset: {value!r} (try +90, +1m30s, +250ms)")
        h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
        return timeline.at_time(timeline.start + h * 3600 + m * 60 + s + ms / 1000)
    if re.fullmatch(r"\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?", value):
        day = dt.datetime.fromtimestamp(timeline.start, zone).date()
        clock = dt.time.fromisoformat(value if value.count(":") == 2 else value + ":00")
        moment = dt.datetime.combine(day, clock, zone).timestamp()
        if moment + 1 < timeline.start:  # past midnight: the next day
            moment += 86400
        return timeline.at_time(moment)
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        return timeline.at_time(number)
    try:
        moment_dt = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"not a time: {value!r} (try 14:03:07, +90, seq 120)") from None
    if moment_dt.tzinfo is None and zone is not None:
        moment_dt = moment_dt.replace(tzinfo=zone)
    return timeline.at_time(moment_dt.timestamp())
