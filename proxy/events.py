"""A bounded in-memory event bus: proxying never waits for a subscriber.

Every event gets a sequence number; a ring keeps the latest ones so a console that
reconnects can ask for everything after the last ``seq`` it saw. A subscriber whose queue
fills up is dropped (its stream ends) and can resume with ``since``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

#: The session of the request being handled in this task (set once identity is known).
CURRENT_SESSION: ContextVar[str | None] = ContextVar("sluice_session", default=None)


def elapsed_ms(started: float) -> float:
    """Milliseconds since ``started`` (a ``time.perf_counter()`` value), as events carry them."""
    return round((time.perf_counter() - started) * 1000, 3)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    ts: float
    type: str
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "type": self.type, **self.data}


@dataclass(eq=False)
class Subscription:
    """One consumer's bounded queue; ``dropped`` is set when it fell too far behind."""

    queue: asyncio.Queue[Event]
    dropped: bool = False
    _bus: EventBus | None = field(default=None, repr=False)

    async def __aiter__(self) -> AsyncIterator[Event]:
        # A full queue is what gets a subscriber dropped, so it never blocks after that.
        while not (self.dropped and self.queue.empty()):
            yield await self.queue.get()

    def close(self) -> None:
        if self._bus is not None:
            self._bus.unsubscribe(self)
            self._bus = None


class EventBus:
    def __init__(self, capacity: int = 10000, subscriber_queue: int = 4096) -> None:
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._subscribers: set[Subscription] = set()
        self._subscriber_queue = subscriber_queue
        self._listeners: list[Callable[[Event], None]] = []
        self._typed: dict[str, list[Callable[[Event], None]]] = {}
        self.dropped_subscribers = 0
        self.last_seq = 0

    def add_listener(
        self, listener: Callable[[Event], None], types: Iterable[str] | None = None
    ) -> None:
        """Synchronous in-process consumers (flow table, metrics); they must be cheap.

        With ``types`` the listener is only called for those event types.
        """
        if types is None:
            self._listeners.append(listener)
            return
        for type_ in types:
            self._typed.setdefault(type_, []).append(listener)

    def publish(self, type_: str, **data: Any) -> Event:
        if "session" not in data and (session := CURRENT_SESSION.get()) is not None:
            data["session"] = session  # every event of a request names its session
        event = Event(next(self._seq), time.time(), type_, data)
        self.last_seq = event.seq
        self._ring.append(event)
        for listener in self._listeners:
            listener(event)
        typed = self._typed.get(type_)
        if typed is not None:
            for listener in typed:
                listener(event)
        for subscriber in list(self._subscribers):
            try:
                subscriber.queue.put_nowait(event)
            except asyncio.QueueFull:
                self._drop(subscriber)
        return event

    def _drop(self, subscriber: Subscription) -> None:
        subscriber.dropped = True
        self._subscribers.discard(subscriber)
        self.dropped_subscribers += 1

    def subscribe(self) -> Subscription:
        subscription = Subscription(asyncio.Queue(self._subscriber_queue), _bus=self)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def since(self, seq: int) -> tuple[list[Event], bool]:
        """Events after ``seq`` still held, and whether some were already forgotten."""
        if seq > self.last_seq:
            # A seq from the future: the client saw another run of the proxy (a restart).
            # Everything this run holds is new to it, and what it missed is a gap.
            return list(self._ring), True
        events = [event for event in self._ring if event.seq > seq]
        oldest = self._ring[0].seq if self._ring else self.last_seq + 1
        return events, seq + 1 < oldest and seq < self.last_seq

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
