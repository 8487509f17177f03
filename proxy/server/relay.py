"""Send an allowed request upstream and stream the answer back, bounded in memory.

Upstream bytes are never decompressed in transit, so ``Content-Encoding`` and
``Content-Length`` keep describing the bytes actually sent.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.events import EventBus, elapsed_ms
from proxy.headers import response_headers_for_agent
from proxy.masking.encodings import DecodeError
from proxy.server.guard import error_response
from proxy.server.masked_relay import (
    ResponseMasking,
    TeeResponse,
    UnmaskableEncoding,
    relay_masked,
    skipped,
    spans_for_event,
)
from proxy.server.requestcheck import BodyTooLarge

log = logging.getLogger("sluice.relay")
CHUNK = 256 * 1024
#: Bodies up to this size with a known length are read whole and sent with their headers.
SMALL_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamFailure:
    status: int
    kind: str
    reason: str


@functools.lru_cache(maxsize=256)
def _upstream_base(upstream: str) -> str:
    base = URL(upstream)
    return str(base.origin()) + base.raw_path.rstrip("/")


def upstream_url(upstream: str, raw_path: str, raw_query: str) -> URL:
    """The target's base URL plus the agent's (already checked) path and query, as sent."""
    query = f"?{raw_query}" if raw_query else ""
    return URL(f"{_upstream_base(upstream)}{raw_path}{query}", encoded=True)


class AgentBody:
    """The agent's body streamed upstream, cut off past ``limit`` bytes or ``deadline``.

    aiohttp's client wraps whatever the upload generator raises, so the reason the upload
    stopped is kept here, where the forwarder can tell an agent fault from an upstream one.
    """

    def __init__(
        self, request: web.Request, limit: int, deadline: float, capture: Any = None
    ) -> None:
        self.request = request
        self.limit = limit
        self.deadline = deadline
        self.capture = capture  # what was sent, kept for the recording's request.body
        self.fault: str | None = None  # "too_large" | "timeout"

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        try:
            async with asyncio.timeout(self.deadline):
                async for chunk in self.request.content.iter_chunked(CHUNK):
                    received += len(chunk)
                    if received > self.limit:
                        self.fault = "too_large"
                        raise BodyTooLarge
                    if self.capture is not None:
                        self.capture.add(chunk)
                    yield chunk
        except TimeoutError:
            self.fault = "timeout"
            raise


def classify_upstream_error(exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamFailure(504, "upstream_timeout", "the upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        detail = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
        return UpstreamFailure(
            502,
            "upstream_tls_failed",
            f"the TLS certificate of {exc.host} could not be verified ({detail}); "
            "Sluice never falls back to an unverified connection",
        )
    if isinstance(exc, aiohttp.ClientSSLError):
        return UpstreamFailure(
            502, "upstream_tls_failed", f"the TLS handshake with {exc.host} failed"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailure(502, "upstream_unreachable", "the upstream refused the connection")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return UpstreamFailure(502, "upstream_reset", "the upstream closed the connection")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return UpstreamFailure(
            502, "upstream_bad_response", "the upstream sent a malformed response"
        )
    log.warning("unexpected upstream error: %s", type(exc).__name__)
    return UpstreamFailure(502, "upstream_error", "the upstream request failed")


class Relay:
    """Streams one upstream response to the agent and reports how it ended."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    def _response_started(self, request_id: str, status: int, upstream_started: float) -> None:
        self.bus.publish(
            "request.response_started",
            request_id=request_id,
            status=status,
            upstream_ms=elapsed_ms(upstream_started),
        )

    def _completed(
        self, request_id: str, status: int, label: str, sent: int, started: float, **extra: Any
    ) -> None:
        self.bus.publish(
            "request.completed",
            request_id=request_id,
            status=status,
            decision=label,
            bytes_out=sent,
            duration_ms=elapsed_ms(started),
            **extra,
        )

    async def relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        request_id: str,
        started: float,
        upstream_started: float,
        label: str = "allowed",
        masking: ResponseMasking | None = None,
        capture: Any = None,
    ) -> web.StreamResponse:
        headers = CIMultiDict(
            response_headers_for_agent(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers
            )
        )
        headers["X-Sluice-Request-Id"] = request_id
        if (
            masking is not None
            and request.method != "HEAD"
            and upstream.status not in (204, 304)
            and not skipped(headers, masking)
        ):
            masked = await self._relay_masked(
                request,
                upstream,
                headers,
                masking,
                request_id,
                started,
                upstream_started,
                label,
                capture,
            )
            if masked is not None:
                return masked
        length = upstream.content_length
        if length is not None and "Transfer-Encoding" in upstream.headers:
            length = None
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            return await self._relay_small(
                request, upstream, headers, request_id, started, upstream_started, label, capture
            )
        response = TeeResponse(status=upstream.status, reason=upstream.reason, capture=capture)
        response.headers.extend(headers)
        if length is not None:
            response.content_length = length
        self._response_started(request_id, upstream.status, upstream_started)
        sent = 0
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(CHUNK):
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError) as exc:
            return self._broken(
                request,
                response,
                request_id,
                started,
                sent,
                UpstreamFailure(499, "client_gone", type(exc).__name__),
                label,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._broken(
                request, response, request_id, started, sent, classify_upstream_error(exc), label
            )
        self._completed(request_id, upstream.status, label, sent, started)
        return response

    async def _relay_masked(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        masking: ResponseMasking,
        request_id: str,
        started: float,
        upstream_started: float,
        label: str,
        capture: Any = None,
    ) -> web.StreamResponse | None:
        """None means: pass unmasked (an undecodable encoding the target lets through)."""

        def on_started() -> None:
            self._response_started(request_id, upstream.status, upstream_started)

        try:
            response, sent, spans = await relay_masked(
                request, upstream, headers, masking, on_started, capture
            )
            if capture is not None:
                capture.spans = spans
        except UnmaskableEncoding as exc:
            if masking.unknown_encoding == "pass":
                return None
            return self.failed(
                request_id,
                started,
                "",
                UpstreamFailure(
                    502,
                    "unmaskable_encoding",
                    f"the upstream sent Content-Encoding {exc} that Sluice cannot decode, "
                    "so it cannot be checked for secrets",
                ),
                label,
            )
        except (DecodeError, aiohttp.ClientError, TimeoutError, ConnectionResetError) as exc:
            if isinstance(exc, DecodeError):
                failure = UpstreamFailure(
                    502, "upstream_bad_response", "the body could not be decoded for masking"
                )
            elif isinstance(exc, ConnectionResetError | aiohttp.ClientConnectionResetError):
                failure = UpstreamFailure(499, "client_gone", type(exc).__name__)
            else:
                failure = classify_upstream_error(exc)
            if not _started(request):
                return self.failed(request_id, started, "", failure, label)
            partial = web.StreamResponse(status=upstream.status)
            return self._broken(request, partial, request_id, started, 0, failure, label)
        self._completed(
            request_id,
            upstream.status,
            label,
            sent,
            started,
            masked=len(spans),
            mask_spans=spans_for_event(spans),
        )
        return response

    async def _relay_small(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        request_id: str,
        started: float,
        upstream_started: float,
        label: str,
        capture: Any = None,
    ) -> web.StreamResponse:
        """A small body with a known length goes out with its headers in one write."""
        try:
            body = await upstream.read()
            if capture is not None:
                capture.add(body)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self.failed(request_id, started, "", classify_upstream_error(exc), label)
        self._response_started(request_id, upstream.status, upstream_started)
        response = web.Response(
            status=upstream.status, reason=upstream.reason, body=body, headers=headers
        )
        self._completed(request_id, upstream.status, label, len(body), started)
        return response

    def _broken(
        self,
        request: web.Request,
        response: web.StreamResponse,
        request_id: str,
        started: float,
        sent: int,
        failure: UpstreamFailure,
        label: str = "allowed",
    ) -> web.StreamResponse:
        """Mid-body failure: the status line is gone, so cut the connection rather than
        let a truncated body look complete."""
        if request.transport is not None:
            request.transport.close()
        self.bus.publish(
            "request.failed",
            request_id=request_id,
            status=response.status,
            decision=label,
            error=failure.reason,
            upstream_error=failure.kind,
            bytes_out=sent,
            duration_ms=elapsed_ms(started),
        )
        return response

    def failed(
        self,
        request_id: str,
        started: float,
        target: str,
        failure: UpstreamFailure,
        label: str = "allowed",
    ) -> web.Response:
        response = error_response(
            failure.status, failure.kind, failure.reason, request_id=request_id
        )
        response.headers["X-Sluice-Request-Id"] = request_id
        self.bus.publish(
            "request.failed",
            request_id=request_id,
            status=failure.status,
            decision=label,
            target=target,
            error=failure.reason,
            upstream_error=failure.kind,
            bytes_out=len(response.body),
            duration_ms=elapsed_ms(started),
        )
        return response


def _started(request: web.Request) -> bool:
    """Whether a response has begun going out on this request's connection."""
    writer = request.writer
    return writer is not None and writer.output_size > 0
