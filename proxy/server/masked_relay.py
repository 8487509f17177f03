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
from proxy.masking.encodings import DecodeError, Decoder, mask_json, scan
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
MAX_SPANS_IN_EVENT = 500
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
        parts = [body, facts.query.encode("latin-1", "replace")]
        parts += [
            value.encode("latin-1", "replace")
            for name, value in request.headers.items()
            if name.lower() not in _OWN_CREDENTIALS
        ]
        return any(scan(masker, part, seen) for part in parts if part)

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

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
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
) -> tuple[web.StreamResponse, int, list[Span]]:
    """Send the masked response; return it, the bytes sent and the mask spans.

    Raises UnmaskableEncoding before anything is sent when the body cannot be decoded and
    the target refuses what it cannot mask.
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
    length = upstream.content_length
    if (
        length is not None
        and (length <= WHOLE_BODY or (json_body and length <= masking.json_limit))
        and media != "text/event-stream"
    ):
        return await _relay_whole(
            request, upstream, headers, masking, decoder, on_started, json_body=json_body
        )
    if media == "text/event-stream":
        masked_stream = Segmented(lambda: SseMasker(masking.masker, masking.seen))
    else:
        masked_stream = Segmented(lambda: masking.masker.stream(masking.seen))
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    response.headers.extend(headers)
    if decoder is None and length is not None:
        response.content_length = length  # same-length masking keeps the framing true
    on_started()
    await response.prepare(request)
    sent = 0
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


async def _relay_whole(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    masking: ResponseMasking,
    decoder: Decoder | None,
    on_started: Any,
    *,
    json_body: bool,
) -> tuple[web.StreamResponse, int, list[Span]]:
    """A body of known, bounded size masked whole and sent with its headers in one write;
    JSON through its escapes and base64 values."""
    raw = bytearray()
    async for chunk in upstream.content.iter_chunked(CHUNK):
        raw += decoder.feed(chunk) if decoder is not None else chunk
        if len(raw) > 4 * masking.json_limit:  # a compressed body may expand; bounded all the same
            raise DecodeError("decoded JSON body is too large to mask whole")
    if decoder is not None:
        raw += decoder.finish()
    body = bytes(raw)
    if json_body:
        result = mask_json(masking.masker, body, masking.seen)
    else:
        result = masking.masker.mask_bytes(body, masking.seen)
    on_started()
    response = web.Response(
        status=upstream.status, reason=upstream.reason, body=result.masked, headers=headers
    )
    return response, len(result.masked), list(result.spans)


def spans_for_event(spans: list[Span]) -> list[dict[str, object]]:
    return [span.as_dict() for span in spans[:MAX_SPANS_IN_EVENT]]


def environ_backend() -> Any:
    """SLUICE_MASKING_BACKEND=python forces the fallback (tests, machines without Hyperscan)."""
    return os.environ.get("SLUICE_MASKING_BACKEND", "auto")
