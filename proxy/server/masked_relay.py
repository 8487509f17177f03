"""Relay a response through the secret masker, as it streams.

Compressed bodies are decoded first (the masker must see plain bytes) and sent decoded
with framing rewritten; JSON up to ``json_limit`` is masked whole so escapes and base64
values are seen; Server-Sent Events are masked across ``data:`` lines; everything else
streams through a ``MaskStream`` whose holdback is released when the upstream goes quiet.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.config import Config, TargetModel
from proxy.masking.builtin import builtin_rules
from proxy.masking.encodings import DecodeError, Decoder, decode_body, mask_json, scan
from proxy.masking.engine import Masker, Span
from proxy.masking.key import load_or_create_mask_key
from proxy.masking.rules import select_rules
from proxy.masking.seen import SeenSecrets
from proxy.masking.sse import SseMasker
from proxy.matcher import Facts, compile_name_globs

_OWN_CREDENTIALS = frozenset({"authorization", "proxy-authorization"})
IDLE_FLUSH = 0.2  # seconds of upstream silence before held-back bytes that cannot be a secret go
#: After this long without a byte, even a possible start of a secret is released: an
#: interactive stream must not stall on its last few bytes. A secret split across a pause
#: this long is the price (documented in docs/masking.md).
IDLE_CUT = 1.0
#: Spans listed in an event (the count is always exact): events are kept in memory.
MAX_SPANS_IN_EVENT = 50
CHUNK = 256 * 1024
#: Bodies up to this size (known length) are masked whole: one write, no stream machinery.
WHOLE_BODY = 64 * 1024


@dataclass(frozen=True)
class TargetMaskingPlan:
    """What masking means for one target under one config: worked out once, reused."""

    masker: Masker
    unknown_encoding: str
    json_limit: int
    skip: re.Pattern[str]


@dataclass(frozen=True)
class ResponseMasking:
    masker: Masker
    seen: SeenSecrets
    unknown_encoding: str
    json_limit: int
    skip: re.Pattern[str]


class MaskingService:
    """Maskers per effective rule selection (compiling one takes tens of ms), seen-secret
    sets per session."""

    def __init__(self, state_dir: Path) -> None:
        self.key = load_or_create_mask_key(state_dir)
        self._maskers: dict[str, Masker] = {}
        self._redacted: dict[tuple[Masker, str], str] = {}
        self._seen: OrderedDict[str, SeenSecrets] = OrderedDict()
        self._plans: dict[tuple[str, str], TargetMaskingPlan | None] = {}

    def for_target(
        self, config: Config, target: TargetModel, session: str
    ) -> ResponseMasking | None:
        key = (config.digest, target.name)
        if key not in self._plans:
            if len(self._plans) > 256:  # plans of configs long replaced
                self._plans.clear()
            self._plans[key] = self._plan(config, target)
        plan = self._plans[key]
        if plan is None:
            return None
        return ResponseMasking(
            plan.masker, self.seen(session), plan.unknown_encoding, plan.json_limit, plan.skip
        )

    def _plan(self, config: Config, target: TargetModel) -> TargetMaskingPlan | None:
        settings, override = config.masking, target.masking
        enabled = settings.enabled if override.enabled is None else override.enabled
        if not enabled:
            return None
        skip = compile_name_globs("skip_types", settings.skip_types or ["\x00"], nocase=True)
        return TargetMaskingPlan(
            masker=self.masker(config, override.disable),
            unknown_encoding=override.unknown_encoding or settings.unknown_encoding,
            json_limit=settings.json_limit,
            skip=skip,
        )

    def masker(self, config: Config, extra_disable: list[str] | None = None) -> Masker:
        settings = config.masking
        disable = [*settings.disable, *(extra_disable or [])]
        key = repr((sorted(disable), [rule.model_dump() for rule in settings.rules]))
        masker = self._maskers.get(key)
        if masker is None:
            rules = select_rules(
                builtin_rules(),
                disable=disable,
                custom=[rule.model_dump() for rule in settings.rules],
            )
            masker = self._maskers[key] = Masker(
                rules, hmac_key=self.key, backend=environ_backend()
            )
        return masker

    def carries_secret(
        self, config: Config, request: web.Request, facts: Facts, body: bytes, session: str
    ) -> bool:
        """Does what the agent sends out hold a secret, or a value masked for it earlier?

        The agent's own credentials for Sluice (Authorization) are not its payload.
        """
        masker = self.masker(config)
        seen = self.seen(session)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if body and encoding and encoding != "identity":
            try:  # the server no longer inflates bodies in transit: do it here to look inside
                body = decode_body(body, encoding, max_size=64 * 1024 * 1024)
            except DecodeError:
                return True  # cannot look inside, so cannot say it is clean: fail closed
        parts = [
            body,
            facts.query.encode("latin-1", "replace"),
            facts.path.encode("utf-8", "surrogateescape"),
            request.raw_path.encode("latin-1", "replace"),
        ]
        parts += [
            value.encode("latin-1", "replace")
            for name, value in request.headers.items()
            if name.lower() not in _OWN_CREDENTIALS
        ]
        return any(scan(masker, part, seen) for part in parts if part)

    def redact_text(self, config: Config, text: str) -> str:
        """Paths and queries shown in events and the console: masked like a body would be."""
        if not text or not config.masking.enabled:
            return text
        masker = self.masker(config)
        key = (masker, text)  # the masker itself: a new rule set never reuses old answers
        shown = self._redacted.get(key)
        if shown is None:  # agents repeat their paths: a stream per request costs ~4% CPU
            data = text.encode("utf-8", "surrogateescape")
            masked = masker.mask_bytes(data).masked
            shown = text if masked == data else masked.decode("utf-8", "replace")
            if len(self._redacted) >= 4096:
                self._redacted.clear()
            self._redacted[key] = shown
        return shown

    def seen(self, session: str) -> SeenSecrets:
        found = self._seen.get(session)
        if found is None:
            found = self._seen[session] = SeenSecrets(self.key)
            while len(self._seen) > 1000:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(session)
        return found


class Segmented:
    """A mask stream that can be cut at a quiet moment and continued with a fresh one.

    Cutting finishes the current stream (releasing everything it held) and starts a new
    one; spans keep their offsets in the whole response.
    """

    def __init__(
        self, factory: Callable[[], Any], can_cut: Callable[[Any], bool] | None = None
    ) -> None:
        self._factory = factory
        self._can_cut = can_cut
        self._current = factory()
        self._base = 0
        self._fed = 0
        self._out = 0
        self.spans: list[Span] = []

    def feed(self, chunk: bytes) -> bytes:
        self._fed += len(chunk)
        return self._count(self._current.feed(chunk))

    def flush_idle(self) -> bytes:
        return self._count(self._current.flush_idle())

    def cut(self) -> bytes:
        if self._out >= self._fed:
            return b""  # nothing held back: no need to start over
        if self._can_cut is not None and not self._can_cut(self._current):
            return self.flush_idle()
        out = self.finish()
        self._base += self._fed
        self._fed = self._out = 0
        self._current = self._factory()
        return out

    def finish(self) -> bytes:
        out = self._count(self._current.finish())
        self.spans += [
            Span(s.start + self._base, s.end + self._base, s.rule, s.fingerprint)
            for s in self._current.spans
        ]
        return out

    def _count(self, out: bytes) -> bytes:
        self._out += len(out)
        return out


class TeeResponse(web.StreamResponse):
    """A streamed response that also hands what it sends to a capture (for the recording)."""

    def __init__(self, *args: Any, capture: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capture = capture

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.capture is not None:
            self.capture.add(bytes(data))
        await super().write(data)


class UnmaskableEncoding(Exception):
    pass


def _media_type(headers: CIMultiDict[str]) -> str:
    return headers.get("Content-Type", "").split(";", 1)[0].strip().lower()


def skipped(headers: CIMultiDict[str], masking: ResponseMasking) -> bool:
    """Binary media (images, video, fonts) pass unmasked: a false match would corrupt them."""
    media = _media_type(headers)
    return bool(media) and masking.skip.fullmatch(media) is not None


async def relay_masked(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    masking: ResponseMasking,
    on_started: Any,
    capture: Any = None,
) -> tuple[web.StreamResponse, int, list[Span]]:
    """Send the masked response; return it, the bytes sent and the mask spans.

    A body that fits (64 KiB, or ``json_limit`` for JSON, decoded) is masked whole and sent
    in one write; a bigger one streams, starting with what was already read. Raises
    UnmaskableEncoding before anything is sent when the body cannot be decoded and the
    target refuses what it cannot mask.
    """
    encoding = headers.get("Content-Encoding", "").strip().lower()
    decoder = None
    if encoding and encoding != "identity":
        try:
            decoder = Decoder(encoding, max_size=1 << 50)
        except DecodeError:
            raise UnmaskableEncoding(encoding) from None
        del headers["Content-Encoding"]
    media = _media_type(headers)
    json_body = media == "application/json" or media.endswith("+json")
    sse = media == "text/event-stream"
    length = upstream.content_length
    prefix = b""
    whole = json_body or (length is not None and length <= WHOLE_BODY)
    if not sse and whole and (length is None or length <= masking.json_limit):
        limit = masking.json_limit if json_body else WHOLE_BODY
        prefix, complete = await _read_upto(upstream, decoder, limit, IDLE_CUT)
        if complete:
            return _whole(
                upstream,
                headers,
                masking,
                prefix,
                on_started,
                json_body=json_body,
                capture=capture,
            )
    if sse:
        masked_stream = Segmented(
            lambda: SseMasker(masking.masker, masking.seen), can_cut=_sse_at_line_end
        )
    else:
        masked_stream = Segmented(lambda: masking.masker.stream(masking.seen))
    response = TeeResponse(status=upstream.status, reason=upstream.reason, capture=capture)
    response.headers.extend(headers)
    if decoder is None and length is not None:
        response.content_length = length  # same-length masking keeps the framing true
    on_started()
    await response.prepare(request)
    sent = 0
    out = masked_stream.feed(prefix) if prefix else b""
    if out:
        await response.write(out)
        sent += len(out)
    reader = upstream.content
    quiet = 0.0
    while True:
        try:
            chunk = await asyncio.wait_for(reader.readany(), IDLE_FLUSH)
        except TimeoutError:
            quiet += IDLE_FLUSH
            out = masked_stream.cut() if quiet >= IDLE_CUT else masked_stream.flush_idle()
            if out:
                await response.write(out)
                sent += len(out)
            continue
        quiet = 0.0
        if not chunk:
            break
        plain = decoder.feed(chunk) if decoder is not None else chunk
        out = masked_stream.feed(plain)
        if out:
            await response.write(out)
            sent += len(out)
    tail = masked_stream.feed(decoder.finish()) if decoder is not None else b""
    tail += masked_stream.finish()
    if tail:
        await response.write(tail)
        sent += len(tail)
    await response.write_eof()
    return response, sent, list(masked_stream.spans)


async def _read_upto(
    upstream: aiohttp.ClientResponse, decoder: Decoder | None, limit: int, patience: float
) -> tuple[bytes, bool]:
    """Read and decode up to ``limit`` bytes for at most ``patience`` seconds; (what was
    read, whether that was all). A slow body goes on as a stream: nothing interactive waits
    for a whole body."""
    raw = bytearray()
    reader = upstream.content
    deadline = asyncio.get_running_loop().time() + patience
    while len(raw) <= limit:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return bytes(raw), False
        try:
            chunk = await asyncio.wait_for(reader.readany(), remaining)
        except TimeoutError:
            return bytes(raw), False
        if not chunk:
            if decoder is not None:
                raw += decoder.finish()
            return bytes(raw), len(raw) <= limit
        raw += decoder.feed(chunk) if decoder is not None else chunk
    return bytes(raw), False


def _sse_at_line_end(stream: Any) -> bool:
    """An SSE segment is only cut between lines: the rest of a line must stay a data line."""
    return not getattr(stream, "_partial", b"")


def _whole(
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    masking: ResponseMasking,
    body: bytes,
    on_started: Any,
    *,
    json_body: bool,
    capture: Any = None,
) -> tuple[web.StreamResponse, int, list[Span]]:
    """Masked whole (JSON through its escapes and base64 values), sent in one write."""
    if json_body:
        result = mask_json(masking.masker, body, masking.seen)
    else:
        result = masking.masker.mask_bytes(body, masking.seen)
    on_started()
    response = web.Response(
        status=upstream.status, reason=upstream.reason, body=result.masked, headers=headers
    )
    if capture is not None:
        capture.add(result.masked)
    return response, len(result.masked), list(result.spans)


def spans_for_event(spans: list[Span]) -> list[dict[str, object]]:
    return [span.as_dict() for span in spans[:MAX_SPANS_IN_EVENT]]


def environ_backend() -> Any:
    """SLUICE_MASKING_BACKEND=python forces the fallback (tests, machines without Hyperscan)."""
    return os.environ.get("SLUICE_MASKING_BACKEND", "auto")
