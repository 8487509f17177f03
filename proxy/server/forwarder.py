"""The reverse-proxy handler: decide, then stream both ways with bounded memory.

Every request reads the config once at the start and finishes under it, even if a
reload swaps in another meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.config import Config, TargetModel
from proxy.events import EventBus
from proxy.headers import (
    forwarded_headers,
    request_headers_for_upstream,
    response_headers_for_agent,
)
from proxy.matcher import Facts, headers_for_facts
from proxy.policy import NEEDS_BODY, Action, Decision
from proxy.reload import ConfigHolder
from proxy.server.guard import error_response
from proxy.server.requestcheck import BadRequest, BodyTooLarge, check_request, read_bounded

log = logging.getLogger("sluice.forwarder")
CHUNK = 256 * 1024


class UpstreamFailure(Exception):
    def __init__(self, status: int, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.kind, self.reason = status, kind, reason


class Forwarder:
    def __init__(self, holder: ConfigHolder, bus: EventBus, session: aiohttp.ClientSession) -> None:
        self.holder = holder
        self.bus = bus
        self.session = session
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Entry point on the main listener: the first path segment names the target."""
        return await self._handle(request, request.app.get(TARGET_KEY))

    async def _handle(self, request: web.Request, fixed_target: str | None) -> web.StreamResponse:
        self.in_flight += 1
        self.idle.clear()
        started = time.perf_counter()
        request_id = secrets.token_hex(8)
        config = self.holder.current
        try:
            return await self._process(request, config, fixed_target, request_id, started)
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self.idle.set()

    async def _process(
        self,
        request: web.Request,
        config: Config,
        fixed_target: str | None,
        request_id: str,
        started: float,
    ) -> web.StreamResponse:
        bus = self.bus
        try:
            target_name, path, raw_query = check_request(request, fixed_target)
        except BadRequest as exc:
            bus.publish(
                "request.received",
                request_id=request_id,
                method=request.method,
                path=request.path,
                client=request.remote,
            )
            return self._refuse(request_id, started, 400, "bad_request", exc.reason, None)
        target = config.targets.get(target_name) if target_name else None
        facts = Facts(
            method=request.method,
            target=target_name,
            path=path,
            query=raw_query,
            host=request.host,
            headers=headers_for_facts(request.headers.items()),
            content_type=request.headers.get("Content-Type", ""),
        )
        bus.publish(
            "request.received",
            request_id=request_id,
            method=request.method,
            target=target_name,
            path=path,
            query=raw_query,
            host=request.host,
            client=request.remote,
        )
        if target is None:
            reason = f"no target named {target_name!r}" if target_name else "no target in the path"
            return self._refuse(request_id, started, 404, "unknown_target", reason, None)

        body: bytes | None = None
        decision = config.policy.evaluate(facts)
        if decision is NEEDS_BODY:
            try:
                body = await read_bounded(
                    request, config.policy.max_body_inspect, config.limits.body_timeout
                )
            except BodyTooLarge:
                decision = config.policy.body_too_large(facts)
            except TimeoutError:
                return self._refuse(
                    request_id,
                    started,
                    408,
                    "body_timeout",
                    "request body was not received in time",
                    None,
                )
            else:
                decision = config.policy.evaluate(_with_body(facts, body))
        if not isinstance(decision, Decision):  # a second NEEDS_BODY would be a bug: deny
            decision = Decision(Action.DENY, None, "policy could not decide", "policy_error")
        if decision.action is Action.APPROVE:
            decision = Decision(
                Action.DENY,
                decision.rule,
                f"{decision.reason} (needs a human approval, and approvals are "
                "not enabled on this proxy)",
                "approval_unavailable",
            )
        bus.publish(
            "request.decided",
            request_id=request_id,
            decision=_label(decision),
            rule=decision.rule,
            reason=decision.reason,
            code=decision.code,
        )
        if not decision.allowed:
            return self._deny(request_id, started, decision)
        return await self._forward(
            request, config, target, path, raw_query, body, request_id, started
        )

    def _deny(self, request_id: str, started: float, decision: Decision) -> web.Response:
        response = error_response(
            403,
            "denied",
            decision.reason,
            rule=decision.rule,
            request_id=request_id,
            code=decision.code,
        )
        response.headers["X-Sluice-Request-Id"] = request_id
        self.bus.publish(
            "request.completed",
            request_id=request_id,
            status=403,
            decision="denied",
            rule=decision.rule,
            bytes_out=len(response.body),
            duration_ms=_ms(started),
        )
        return response

    def _refuse(
        self,
        request_id: str,
        started: float,
        status: int,
        error: str,
        reason: str,
        rule: str | None,
    ) -> web.Response:
        """A refusal that is not a policy decision (bad input, unknown target, timeouts)."""
        response = error_response(status, error, reason, request_id=request_id)
        response.headers["X-Sluice-Request-Id"] = request_id
        self.bus.publish(
            "request.completed",
            request_id=request_id,
            status=status,
            decision="refused",
            rule=rule,
            code=error,
            reason=reason,
            bytes_out=len(response.body),
            duration_ms=_ms(started),
        )
        return response

    async def _forward(
        self,
        request: web.Request,
        config: Config,
        target: TargetModel,
        path: str,
        raw_query: str,
        body: bytes | None,
        request_id: str,
        started: float,
    ) -> web.StreamResponse:
        upstream_url = _upstream_url(target.upstream, path, raw_query)
        headers = request_headers_for_upstream(request.headers.items())
        peer = request.remote or "unknown"
        headers += forwarded_headers(
            client_ip=peer, host=request.host, scheme=request.scheme, request_id=request_id
        )
        if target.preserve_host:
            headers.append(("Host", request.host))
        limits = config.limits
        data: bytes | AsyncIterator[bytes] | None = body
        if body is None and request.body_exists:
            if request.content_length is not None:
                if request.content_length > limits.max_body_size:
                    return self._refuse(
                        request_id,
                        started,
                        413,
                        "body_too_large",
                        f"request body exceeds {limits.max_body_size} bytes",
                        None,
                    )
                headers.append(("Content-Length", str(request.content_length)))
            data = _stream_body(request, limits.max_body_size, limits.body_timeout)
        elif body is not None:
            headers.append(("Content-Length", str(len(body))))
        timeout = aiohttp.ClientTimeout(
            total=None, connect=limits.upstream_connect_timeout, sock_read=limits.upstream_timeout
        )
        self.bus.publish("request.forwarded", request_id=request_id, upstream=target.name)
        upstream_started = time.perf_counter()
        try:
            upstream = await self.session.request(
                request.method,
                upstream_url,
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=timeout,
                skip_auto_headers=("User-Agent",),
            )
        except BodyTooLarge:
            return self._refuse(
                request_id,
                started,
                413,
                "body_too_large",
                f"request body exceeds {limits.max_body_size} bytes",
                None,
            )
        except Exception as exc:
            failure = _classify_upstream_error(exc)
            return self._upstream_failed(request_id, started, target.name, failure)
        try:
            return await self._relay(request, upstream, request_id, started, upstream_started)
        finally:
            upstream.release()

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        started: float,
        upstream_started: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in response_headers_for_agent(
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers
        ):
            response.headers.add(name, value)
        response.headers["X-Sluice-Request-Id"] = request_id
        if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
            response.content_length = upstream.content_length
        self.bus.publish(
            "request.response_started",
            request_id=request_id,
            status=upstream.status,
            upstream_ms=round((time.perf_counter() - upstream_started) * 1000, 3),
        )
        sent = 0
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            return self._broken(
                request, response, request_id, started, sent, "client_gone", type(exc).__name__
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            failure = _classify_upstream_error(exc)
            return self._broken(
                request, response, request_id, started, sent, failure.kind, failure.reason
            )
        self.bus.publish(
            "request.completed",
            request_id=request_id,
            status=upstream.status,
            decision="allowed",
            bytes_out=sent,
            duration_ms=_ms(started),
        )
        return response

    def _broken(
        self,
        request: web.Request,
        response: web.StreamResponse,
        request_id: str,
        started: float,
        sent: int,
        kind: str,
        reason: str,
    ) -> web.StreamResponse:
        """Mid-body failure: the status line is gone, so cut the connection rather than
        let a truncated body look complete."""
        if request.transport is not None:
            request.transport.close()
        self.bus.publish(
            "request.failed",
            request_id=request_id,
            status=response.status,
            decision="allowed",
            error=reason,
            upstream_error=kind,
            bytes_out=sent,
            duration_ms=_ms(started),
        )
        return response

    def _upstream_failed(
        self, request_id: str, started: float, target: str, failure: UpstreamFailure
    ) -> web.Response:
        response = error_response(
            failure.status, failure.kind, failure.reason, request_id=request_id
        )
        response.headers["X-Sluice-Request-Id"] = request_id
        self.bus.publish(
            "request.failed",
            request_id=request_id,
            status=failure.status,
            decision="allowed",
            target=target,
            error=failure.reason,
            upstream_error=failure.kind,
            bytes_out=len(response.body),
            duration_ms=_ms(started),
        )
        return response


TARGET_KEY = web.AppKey("sluice_fixed_target", str)


def _label(decision: Decision) -> str:
    return {Action.ALLOW: "allowed", Action.DENY: "denied", Action.APPROVE: "held"}[decision.action]


def _with_body(facts: Facts, body: bytes) -> Facts:
    from dataclasses import replace

    return replace(facts, body=body)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _upstream_url(upstream: str, path: str, raw_query: str) -> URL:
    base = URL(upstream)
    encoded_path = URL.build(path=path).raw_path
    prefix = base.raw_path.rstrip("/")
    return URL.build(
        scheme=base.scheme,
        host=base.raw_host or "",
        port=base.explicit_port,
        path=prefix + encoded_path,
        query_string=raw_query,
        encoded=True,
    )


async def _stream_body(request: web.Request, limit: int, deadline: float) -> AsyncIterator[bytes]:
    """The agent's body, streamed upstream, cut off past ``limit`` or ``deadline``."""
    received = 0
    async with asyncio.timeout(deadline):
        async for chunk in request.content.iter_chunked(CHUNK):
            received += len(chunk)
            if received > limit:
                raise BodyTooLarge
            yield chunk


def _classify_upstream_error(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return UpstreamFailure(504, "upstream_timeout", "the upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, "upstream_unreachable", "the upstream refused the connection")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        return UpstreamFailure(502, "upstream_reset", "the upstream closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return UpstreamFailure(502, "upstream_bad_response", "the upstream sent a broken body")
    if isinstance(exc, aiohttp.ClientResponseError):
        return UpstreamFailure(
            502, "upstream_bad_response", "the upstream sent a malformed response"
        )
    log.warning("unexpected upstream error: %s", type(exc).__name__)
    return UpstreamFailure(502, "upstream_error", "the upstream request failed")
