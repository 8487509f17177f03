"""The admin listener: health, the event stream, recent flows and metrics for consoles.

Every endpoint requires the admin bearer token; a wrong or missing token learns nothing
but 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from proxy import __version__
from proxy.approvals import ApprovalDesk, ApprovalError
from proxy.events import Event, EventBus
from proxy.flows import FlowTable
from proxy.identity import IdentityError, KeysUnavailable
from proxy.metrics import CONTENT_TYPE, ProxyMetrics
from proxy.reload import ConfigHolder
from proxy.server.flow_detail import FlowDetails
from proxy.server.guard import error_response
from proxy.server.identity_http import IdentityGate
from proxy.state import tokens_equal

HEARTBEAT_SECONDS = 15.0
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
LOCAL_OPERATOR = "local-operator"
PRINCIPAL_KEY = web.RequestKey("sluice_principal", str)


class AdminApi:
    def __init__(
        self,
        *,
        token: str,
        holder: ConfigHolder,
        bus: EventBus,
        flows: FlowTable,
        metrics: ProxyMetrics,
        status: Callable[[], dict[str, Any]],
        gate: IdentityGate | None = None,
        desk: ApprovalDesk | None = None,
        details: FlowDetails | None = None,
    ) -> None:
        self.details = details
        self.desk = desk
        self.gate = gate
        self.token = token
        self.holder = holder
        self.bus = bus
        self.flows = flows
        self.metrics = metrics
        self.status = status
        self.closing = asyncio.Event()
        self.started = time.time()

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._require_token], client_max_size=64 * 1024)
        app.router.add_get("/api/health", self.health)
        app.router.add_get("/api/events", self.events)
        app.router.add_get("/api/flows", self.recent_flows)
        app.router.add_get("/api/flows/{request_id}", self.flow_detail)
        app.router.add_get("/metrics", self.render_metrics)
        app.router.add_get("/.well-known/jwks.json", self.jwks)
        app.router.add_get("/api/approvals", self.approvals)
        app.router.add_post("/api/approvals/{approval_id}", self.decide)
        return app

    @web.middleware
    async def _require_token(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/.well-known/jwks.json":
            return await handler(request)
        principal = await self._principal(request.headers.get("Authorization", ""))
        if principal is None:
            response = error_response(401, "unauthorized", "a valid admin token is required")
            response.headers["WWW-Authenticate"] = 'Bearer realm="sluice-admin"'
            return response
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    async def _principal(self, authorization: str) -> str | None:
        """The local operator (admin token) or an approver (JWT in an approver group)."""
        scheme, _, given = authorization.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            return None
        if tokens_equal(given, self.token):
            return LOCAL_OPERATOR
        config = self.holder.current
        if self.gate is None or not config.identity.approver_groups:
            return None
        try:
            identity = await self.gate.authenticate(config, authorization)
        except (IdentityError, KeysUnavailable):
            return None
        if set(identity.groups) & set(config.identity.approver_groups):
            return identity.subject
        return None

    async def approvals(self, _request: web.Request) -> web.Response:
        pending = self.desk.pending() if self.desk is not None else []
        return web.json_response({"approvals": pending})

    async def decide(self, request: web.Request) -> web.Response:
        """``{"decision": "approve"|"deny", "scope": "once"|"session"|"always", "reason"}``."""
        if self.desk is None:
            return error_response(404, "not_found", "approvals are not enabled")
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "bad_request", "the body must be JSON")
        if not isinstance(body, dict):
            return error_response(400, "bad_request", "the body must be a JSON object")
        reason = body.get("reason") or ""
        if not isinstance(reason, str) or len(reason) > 2000:
            return error_response(400, "bad_request", "reason must be a string (2000 chars max)")
        try:
            summary = self.desk.decide(
                request.match_info["approval_id"],
                str(body.get("decision", "")),
                str(body.get("scope", "once")),
                reason,
                request[PRINCIPAL_KEY],
            )
        except ApprovalError as exc:
            extra = {"current": exc.current} if exc.current is not None else {}
            return error_response(exc.status, exc.error, exc.reason, **extra)
        return web.json_response(summary)

    async def jwks(self, _request: web.Request) -> web.Response:
        """Public keys of the local issuer, so upstreams and tools can verify its tokens."""
        document = self.gate.jwks(self.holder.current) if self.gate else None
        if document is None:
            return error_response(404, "not_found", "this proxy does not issue tokens")
        return web.json_response(document)

    async def health(self, request: web.Request) -> web.Response:
        config = self.holder.current
        body = {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "identity": config.identity.mode,
            "config": {
                "path": str(config.path),
                "digest": config.digest,
                "reloads": self.holder.reloads,
                "last_error": self.holder.last_error,
            },
            "principal": request[PRINCIPAL_KEY],
            "flows": len(self.flows),
            "last_seq": self.bus.last_seq,
            "pending_approvals": len(self.desk.pending()) if self.desk is not None else 0,
            **self.status(),
        }
        return web.json_response(body)

    async def recent_flows(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return error_response(400, "bad_request", "limit must be an integer")
        return web.json_response({"flows": self.flows.recent(max(0, min(limit, 100_000)))})

    async def flow_detail(self, request: web.Request) -> web.Response:
        """One flow's headers and bodies, from the recording (responses masked, as sent)."""
        request_id = request.match_info["request_id"]
        if not _REQUEST_ID.fullmatch(request_id):
            return error_response(400, "bad_request", "not a request id")
        if self.details is None:
            return error_response(
                404, "not_recorded", "this proxy records nothing, so it keeps no bodies"
            )
        try:
            detail = await self.details.detail(request_id)
        except Exception as exc:  # a torn or unreadable recording: say so, keep serving
            return error_response(
                503, "recording_unreadable", f"the recording cannot be read ({type(exc).__name__})"
            )
        if detail is None:
            return error_response(404, "unknown_flow", "the recording has no such request")
        return web.json_response(detail)

    async def render_metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events; ``?since=N`` (or Last-Event-ID) replays what the bus holds."""
        since_text = request.query.get("since") or request.headers.get("Last-Event-ID")
        try:
            since = int(since_text) if since_text is not None else None
        except ValueError:
            return error_response(400, "bad_request", "since must be an integer seq")
        subscription = self.bus.subscribe()  # subscribe before replay so nothing falls between
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            last = self.bus.last_seq
            if since is not None:
                replay, gap = self.bus.since(since)
                if gap:
                    await response.write(_sse("stream.gap", {"since": since, "seq": None}))
                for event in replay:
                    await response.write(_sse_event(event))
                last = replay[-1].seq if replay else min(since, self.bus.last_seq)
            await response.write(_sse("stream.ready", {"last_seq": self.bus.last_seq}))
            await self._pump(response, subscription, last)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            subscription.close()
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _pump(self, response: web.StreamResponse, subscription: Any, last: int) -> None:
        queue = subscription.queue
        closing = asyncio.ensure_future(self.closing.wait())
        try:
            while not closing.done():
                if subscription.dropped and queue.empty():
                    await response.write(_sse("stream.dropped", {"last_seq": last}))
                    return
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, closing},
                    timeout=HEARTBEAT_SECONDS,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if getter not in done:
                    getter.cancel()
                    if not done:
                        await response.write(b": keep-alive\n\n")
                    continue
                event: Event = getter.result()
                if event.seq > last:
                    await response.write(_sse_event(event))
                    last = event.seq
        finally:
            closing.cancel()


def _sse_event(event: Event) -> bytes:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {json.dumps(event.to_json())}\n\n".encode()


def _sse(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
