"""The admin API client: the console's only way to reach a proxy (local or remote).

Plain aiohttp. The event stream reconnects by itself and resumes with ``?since=<seq>``, so
a console survives proxy restarts and network blips; it reports its connection state so
the UI can say when what it shows may be stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import quote

import aiohttp

#: The proxy sends a keep-alive comment every 15 s; silence for longer means a dead link.
READ_TIMEOUT = 40.0
CONNECT_TIMEOUT = 5.0
#: A proxy whose start time moved by more than this was restarted (its seqs restart too).
RESTART_SLACK = 3.0


class ConnState(StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    LOST = "lost"
    RECONNECTING = "reconnecting"


@dataclass(frozen=True)
class ConnChange:
    """One change of the stream's state; ``reason`` says why it was lost."""

    state: ConnState
    reason: str = ""
    attempt: int = 0


class AdminError(Exception):
    """An admin API call that did not succeed; ``status`` 0 means no HTTP answer at all."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body or {}


@dataclass(frozen=True)
class DecideResult:
    """The outcome of a decision; ``conflict`` carries who decided first on a 409."""

    ok: bool
    status: int
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    conflict_by: str | None = None


def describe_error(exc: BaseException) -> str:
    """A short, human reason for a failed connection (never the token)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the proxy closed the connection"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "no answer from the proxy (timeout)"
    if isinstance(exc, AdminError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class AdminClient:
    """``health``, ``flows``, ``approvals``, ``decide`` and a resuming ``stream``."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                trust_env=False,
                headers={"Authorization": f"Bearer {self._token}"},
                timeout=aiohttp.ClientTimeout(total=15, connect=CONNECT_TIMEOUT),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, path: str, **params: Any) -> dict[str, Any]:
        async with self.session.get(f"{self.base_url}{path}", params=params or None) as reply:
            body = await _json(reply)
            if reply.status != 200:
                raise AdminError(reply.status, _error_text(reply.status, body), body)
            return body

    async def health(self) -> dict[str, Any]:
        return await self._get("/api/health")

    async def flows(self, limit: int = 1000) -> list[dict[str, Any]]:
        return list((await self._get("/api/flows", limit=str(limit))).get("flows", []))

    async def flow_detail(self, request_id: str) -> dict[str, Any]:
        """One flow's headers and bodies as the proxy recorded them."""
        return await self._get(f"/api/flows/{quote(request_id, safe='')}")

    async def approvals(self) -> list[dict[str, Any]]:
        return list((await self._get("/api/approvals")).get("approvals", []))

    async def decide(
        self, approval_id: str, decision: str, scope: str = "once", reason: str = ""
    ) -> DecideResult:
        """POST a decision; a 409 names who decided first instead of raising."""
        payload = {"decision": decision, "scope": scope, "reason": reason}
        url = f"{self.base_url}/api/approvals/{approval_id}"
        try:
            async with self.session.post(url, json=payload) as reply:
                body = await _json(reply)
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return DecideResult(False, 0, error=describe_error(exc))
        if status == 200:
            return DecideResult(True, status, body)
        current = body.get("current") if isinstance(body.get("current"), dict) else {}
        return DecideResult(
            False,
            status,
            current or {},
            error=_error_text(status, body),
            conflict_by=(current or {}).get("decided_by") if status == 409 else None,
        )

    def stream(
        self,
        on_events: Callable[[list[dict[str, Any]]], None],
        on_state: Callable[[ConnChange], None],
        *,
        on_gap: Callable[[], None] | None = None,
        on_health: Callable[[dict[str, Any]], None] | None = None,
        backoff: tuple[float, float] = (0.25, 5.0),
    ) -> EventStream:
        return EventStream(self, on_events, on_state, on_gap, on_health, backoff)


class EventStream:
    """Follows ``/api/events`` until ``stop()``: reconnects with backoff, resumes by seq.

    Events are handed over in batches (one call per received chunk), never one callback
    per event, so the UI can queue them cheaply. ``on_gap`` asks for a resync from
    ``/api/flows`` and ``/api/approvals`` (the proxy forgot events, or it restarted).
    """

    def __init__(
        self,
        client: AdminClient,
        on_events: Callable[[list[dict[str, Any]]], None],
        on_state: Callable[[ConnChange], None],
        on_gap: Callable[[], None] | None,
        on_health: Callable[[dict[str, Any]], None] | None,
        backoff: tuple[float, float],
    ) -> None:
        self.client = client
        self.on_events = on_events
        self.on_state = on_state
        self.on_gap = on_gap or (lambda: None)
        self.on_health = on_health or (lambda _health: None)
        self.backoff = backoff
        self.last_seq: int | None = None
        self.proxy_started: float | None = None
        self.state = ConnState.CONNECTING
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name="sluice-event-stream")
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _set(self, state: ConnState, reason: str = "", attempt: int = 0) -> None:
        if state is self.state and state is not ConnState.LOST:
            return
        self.state = state
        self.on_state(ConnChange(state, reason, attempt))

    async def run(self) -> None:
        delay, attempt = self.backoff[0], 0
        self._set(ConnState.CONNECTING)
        while True:
            try:
                await self._check_restart()
                await self._follow()
                reason = "the proxy ended the event stream"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: say so, wait, and try again
                reason = describe_error(exc)
            if self.state is ConnState.CONNECTED:
                delay, attempt = self.backoff[0], 0
            attempt += 1
            self._set(ConnState.LOST, reason, attempt)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])
            self._set(ConnState.RECONNECTING, reason, attempt)

    async def _check_restart(self) -> None:
        """A restarted proxy numbers events from 1 again: resume from its beginning."""
        health = await self.client.health()
        started = time.time() - float(health.get("uptime_s", 0.0))
        if self.proxy_started is not None and abs(started - self.proxy_started) > RESTART_SLACK:
            self.last_seq = 0
            self.on_gap()
        self.proxy_started = started
        self.on_health(health)

    async def _follow(self) -> None:
        params = {"since": str(self.last_seq)} if self.last_seq is not None else None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        url = f"{self.client.base_url}/api/events"
        async with self.client.session.get(url, params=params, timeout=timeout) as reply:
            if reply.status != 200:
                body = await _json(reply)
                raise AdminError(reply.status, _error_text(reply.status, body), body)
            buffer = b""
            while True:
                chunk = await asyncio.wait_for(reply.content.readany(), READ_TIMEOUT)
                if not chunk:
                    return
                buffer += chunk.replace(b"\r\n", b"\n")
                *blocks, buffer = buffer.split(b"\n\n")
                if blocks and not self._deliver(blocks):
                    return

    def _deliver(self, blocks: list[bytes]) -> bool:
        """Hand a chunk's events over; False when the proxy dropped this subscriber."""
        batch: list[dict[str, Any]] = []
        keep_going = True
        for block in blocks:
            kind, data = parse_sse_block(block)
            if kind is None:
                continue
            if kind == "stream.ready":
                ready_seq = data.get("last_seq")
                if self.last_seq is None and isinstance(ready_seq, int):
                    self.last_seq = ready_seq
                self._set(ConnState.CONNECTED)
            elif kind == "stream.gap":
                self.on_gap()
            elif kind == "stream.dropped":
                keep_going = False  # reconnect at once and resume from our last seq
                break
            else:
                seq = data.get("seq")
                if isinstance(seq, int):
                    self.last_seq = seq
                data.setdefault("type", kind)
                batch.append(data)
        if batch:
            self.on_events(batch)
        return keep_going


def parse_sse_block(block: bytes) -> tuple[str | None, dict[str, Any]]:
    """One SSE message: its ``event`` name and JSON ``data`` (comments give None)."""
    kind: str | None = None
    data_lines: list[str] = []
    for raw in block.decode("utf-8", "replace").split("\n"):
        if not raw or raw.startswith(":"):
            continue
        name, _, value = raw.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data_lines.append(value)
    if not data_lines:
        return None, {}
    try:
        data = json.loads("\n".join(data_lines))
    except ValueError:
        return None, {}
    if not isinstance(data, dict):
        return None, {}
    return kind or str(data.get("type", "message")), data


async def _json(reply: aiohttp.ClientResponse) -> dict[str, Any]:
    try:
        body = json.loads(await reply.read() or b"{}")
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_text(status: int, body: dict[str, Any]) -> str:
    if status == 401:
        return "the admin token was refused (401)"
    reason = body.get("reason") or body.get("error") or "no details"
    return f"HTTP {status}: {reason}"
