"""Encodings that hide secrets from a byte-level scan, and how to mask through them.

* ``Decoder`` / ``decode_body``: gzip, deflate, br, zstd (streaming where the library can),
  with a size cap against decompression bombs.
* ``mask_json``: a JSON body masked at the byte level, then inside every string that has
  escapes (``\\n`` in a PEM, ``\\/``, ``\\uXXXX``) and every string that is base64 (file
  contents APIs); output stays valid JSON of the same length.
* ``scan``: spans for an outbound body, query string or header value, looking through
  percent-encoding, JSON strings and base64 values, plus secrets masked earlier
  (``SeenSecrets``).
* SSE streams are in ``sse.py``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import zlib
from collections.abc import Callable, Iterable

from proxy.masking.engine import Masker, MaskResult, SecretSink, Span
from proxy.masking.seen import SeenSecrets

# --- compression ------------------------------------------------------------------------


class DecodeError(ValueError):
    """A body that cannot be decoded, uses an unknown coding, or inflates past the cap."""


class _Identity:
    def decompress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _Brotli:
    def __init__(self) -> None:
        try:
            import brotli
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise DecodeError("br: the brotli package is not installed") from exc
        self._d = brotli.Decompressor()

    def decompress(self, data: bytes) -> bytes:
        return self._d.process(data)

    def flush(self) -> bytes:
        if not self._d.is_finished():
            raise DecodeError("br: truncated stream")
        return b""


class _Zstd:
    def __init__(self) -> None:
        try:
            import zstandard
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise DecodeError("zstd: the zstandard package is not installed") from exc
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes) -> bytes:
        return self._d.decompress(data)

    def flush(self) -> bytes:
        return b""


class _Zlib:
    """gzip, or deflate that is zlib-wrapped as the RFC says or raw as some servers send."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._d: object | None = None
        self._gzip = coding in ("gzip", "x-gzip")

    def decompress(self, data: bytes) -> bytes:
        if self._d is None:
            if self._gzip:
                wbits = 16 + zlib.MAX_WBITS
            else:
                wbits = zlib.MAX_WBITS if data[:1] and data[0] & 0x0F == 8 else -zlib.MAX_WBITS
            self._d = zlib.decompressobj(wbits)
        return self._d.decompress(data)  # type: ignore[attr-defined]

    def flush(self) -> bytes:
        if self._d is None:
            return b""
        if self._gzip and not self._d.eof:  # type: ignore[attr-defined]
            raise DecodeError(f"{self._coding}: truncated stream")
        return self._d.flush()  # type: ignore[attr-defined]


_CODECS: dict[str, Callable[[], object]] = {
    "identity": _Identity,
    "gzip": lambda: _Zlib("gzip"),
    "x-gzip": lambda: _Zlib("x-gzip"),
    "deflate": lambda: _Zlib("deflate"),
    "br": _Brotli,
    "zstd": _Zstd,
}


class Decoder:
    """Undo a ``Content-Encoding`` list (``"gzip, br"`` was applied gzip first) chunk by chunk."""

    def __init__(self, content_encoding: str, *, max_size: int = 64 * 1024 * 1024) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
        unknown = [c for c in codings if c not in _CODECS]
        if unknown:
            raise DecodeError(f"unsupported content-encoding {unknown[0]!r}")
        self._stages = [_CODECS[c]() for c in reversed(codings)]
        self._max = max_size
        self._out = 0

    def _through(self, data: bytes, start: int, *, final: bool) -> bytes:
        for stage in self._stages[start:]:
            try:
                data = stage.decompress(data) if data else b""  # type: ignore[attr-defined]
                if final:
                    data += stage.flush()  # type: ignore[attr-defined]
            except DecodeError:
                raise
            except Exception as exc:  # zlib.error, brotli.error, zstd.ZstdError
                raise DecodeError(f"cannot decode body: {exc}") from exc
        self._out += len(data)
        if self._out > self._max:
            raise DecodeError(f"decoded body exceeds {self._max} bytes")
        return data

    def feed(self, chunk: bytes) -> bytes:
        return self._through(chunk, 0, final=False)

    def finish(self) -> bytes:
        return self._through(b"", 0, final=True)


def decode_body(data: bytes, content_encoding: str, *, max_size: int = 64 * 1024 * 1024) -> bytes:
    decoder = Decoder(content_encoding, max_size=max_size)
    return decoder.feed(data) + decoder.finish()


# --- JSON strings ----------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"(?:[^"\\\n]|\\.)*"')
_ESCAPE = re.compile(rb'\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt])')
_SIMPLE = {
    b'"': '"',
    b"\\": "\\",
    b"/": "/",
    b"b": "\b",
    b"f": "\f",
    b"n": "\n",
    b"r": "\r",
    b"t": "\t",
}
#: Base64 as APIs send it: GitHub's contents API wraps lines and ends with a newline.
_B64 = re.compile(rb"[A-Za-z0-9+/_\-\r\n]{24,}={0,2}[\r\n]*")
_ASCII_RUN = re.compile(rb"[\x00-\x5b\x5d-\x7f]+")  # ASCII but the backslash


def unescape_json(raw: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """Decode a JSON string body (no quotes) to UTF-8 and map each decoded byte to the raw
    range it came from, so masking a decoded byte can mask exactly its raw spelling."""
    text: list[str] = []
    pieces: list[tuple[int, int]] = []
    pos, size = 0, len(raw)
    while pos < size:
        if raw[pos] == 0x5C:  # backslash
            found = _ESCAPE.match(raw, pos)
            if found is None:
                raise ValueError("bad JSON escape")
            esc = found.group()
            if esc[1:2] == b"u":
                code = int(esc[2:], 16)
                end = found.end()
                low = _ESCAPE.match(raw, end)
                if 0xD800 <= code < 0xDC00 and low and low.group()[1:2] == b"u":
                    second = int(low.group()[2:], 16)
                    if 0xDC00 <= second < 0xE000:
                        code = 0x10000 + ((code - 0xD800) << 10) + (second - 0xDC00)
                        end = low.end()
                char = chr(code)
            else:
                char, end = _SIMPLE[esc[1:2]], found.end()
        else:
            run = _ASCII_RUN.match(raw, pos)
            if run is not None:
                # Plain ASCII maps byte for byte: take the whole run at once.
                end = run.end()
                text.append(raw[pos:end].decode("ascii"))
                pieces.extend(zip(range(pos, end), range(pos + 1, end + 1), strict=True))
                pos = end
                continue
            lead = raw[pos]
            width = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            end = min(pos + width, size)
            char = raw[pos:end].decode("utf-8", "surrogateescape")
        encoded = char.encode("utf-8", "surrogateescape")
        text.append(char)
        pieces.extend([(pos, end)] * len(encoded))
        pos = end
    return "".join(text).encode("utf-8", "surrogateescape"), pieces


def _quick_unescape(raw: bytes) -> bytes | None:
    """The decoded string via the C JSON parser, or None when only the careful path can say."""
    try:
        return json.loads(b'"' + raw + b'"').encode("utf-8")
    except (ValueError, UnicodeError):
        return None


def _masked_positions(original: bytes, masked: bytes) -> list[int]:
    if original == masked:
        return []  # the common case: nothing masked, no per-byte walk
    return [i for i, (a, b) in enumerate(zip(original, masked, strict=True)) if a != b]


def _b64_decode(compact: bytes) -> bytes | None:
    """Decode standard or URL-safe base64, padded or not; None if it is not base64 text."""
    if len(compact) % 4 == 1:
        return None
    padded = compact + b"=" * (-len(compact) % 4)
    try:
        if b"-" in compact or b"_" in compact:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None


def _b64_encode_like(data: bytes, model: bytes) -> bytes:
    urlsafe = b"-" in model or b"_" in model
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(data)
    return encoded if model.endswith(b"=") else encoded.rstrip(b"=")


def _looks_textual(data: bytes) -> bool:
    if not data:
        return False
    printable = sum(1 for b in data if 32 <= b < 127 or b in (9, 10, 13))
    return printable >= 0.85 * len(data)


class _JsonMasking:
    """Collects masked raw positions and spans for one body."""

    def __init__(self, masker: Masker, data: bytes, seen: SecretSink | None) -> None:
        self.masker, self.data, self.seen = masker, data, seen
        first = masker.mask_bytes(data, seen)
        self.out = bytearray(first.masked)
        self.spans = list(first.spans)

    def string(self, start: int, end: int) -> None:
        """One JSON string literal at ``data[start:end]`` (quotes excluded)."""
        raw = self.data[start:end]
        escaped = b"\\" in raw
        if not escaped and _B64.fullmatch(raw) is None:
            return  # no escapes and not base64: the pass over the raw body already saw it all
        quick = _quick_unescape(raw) if escaped else raw
        if (
            quick is not None
            and _B64.fullmatch(quick) is None
            and not (escaped and self.masker.scan(quick))
        ):
            return  # decoded (in C) and clean: skip the byte-by-byte mapping
        try:
            decoded, pieces = unescape_json(raw)
        except ValueError:
            return
        if b"\\" in raw:
            inner = self.masker.mask_bytes(decoded, self.seen)
            self._apply(start, pieces, _masked_positions(decoded, inner.masked), inner.spans)
        self._base64(start, decoded, pieces)

    def _apply(
        self, start: int, pieces: list[tuple[int, int]], positions: Iterable[int], spans: list[Span]
    ) -> None:
        for i in positions:
            a, b = pieces[i]
            self.out[start + a : start + b] = b"*" * (b - a)
        for span in spans:
            a, b = pieces[span.start][0], pieces[span.end - 1][1]
            self.spans.append(Span(start + a, start + b, span.rule, span.fingerprint))

    def _base64(self, start: int, decoded: bytes, pieces: list[tuple[int, int]]) -> None:
        found = _B64.fullmatch(decoded)
        if found is None:
            return
        keep = [i for i, c in enumerate(decoded) if c not in (10, 13)]
        compact = bytes(decoded[i] for i in keep)
        plain = _b64_decode(compact)
        if plain is None or not _looks_textual(plain):
            return
        inner = self.masker.mask_bytes(plain, self.seen)
        if not inner.spans:
            return
        fresh = _b64_encode_like(inner.masked, compact)
        if len(fresh) != len(compact):
            return
        spans = []
        for span in inner.spans:
            lo, hi = span.start // 3 * 4, min(-(-span.end // 3) * 4, len(compact))
            spans.append(Span(keep[lo], keep[hi - 1] + 1, span.rule, span.fingerprint))
        self._apply(start, pieces, [], spans)
        for k, (old, new) in enumerate(zip(compact, fresh, strict=True)):
            if old == new:
                continue
            a, b = pieces[keep[k]]
            if b - a == 1:
                self.out[start + a] = new
            else:  # an escaped "\/" cannot hold another character at the same length
                self.out[start + a : start + b] = b"*" * (b - a)

    def result(self) -> MaskResult:
        return MaskResult(bytes(self.out), merge_spans(self.spans, self.masker, self.data))


def merge_spans(spans: list[Span], masker: Masker, data: bytes) -> list[Span]:
    """Union overlapping spans; a merged span gets the fingerprint of its original bytes."""
    order = {rule.id: index for index, rule in enumerate(masker.rules)}
    merged: list[list[Span]] = []
    for span in sorted(set(spans), key=lambda s: (s.start, -s.end, order.get(s.rule, 1 << 30))):
        if merged and span.start < max(s.end for s in merged[-1]):
            merged[-1].append(span)
        else:
            merged.append([span])
    out = []
    for group in merged:
        if len(group) == 1:
            out.append(group[0])
            continue
        start, end = group[0].start, max(s.end for s in group)
        out.append(Span(start, end, group[0].rule, masker.fingerprint(data[start:end])))
    return out


def mask_json(masker: Masker, data: bytes, seen: SecretSink | None = None) -> MaskResult:
    """Mask a JSON body through its escapes and base64 strings; same length, still JSON."""
    job = _JsonMasking(masker, data, seen)
    for found in _JSON_STRING.finditer(data):
        job.string(found.start() + 1, found.end() - 1)
    return job.result()


# --- outbound ---------------------------------------------------------------------------

_PERCENT = re.compile(rb"%[0-9A-Fa-f]{2}|\+")


def percent_decode(data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """``%XX`` and ``+`` (forms) decoded, each decoded byte mapped to its raw range."""
    out = bytearray()
    pieces: list[tuple[int, int]] = []
    pos = 0
    for found in _PERCENT.finditer(data):
        for i in range(pos, found.start()):
            out.append(data[i])
            pieces.append((i, i + 1))
        token = found.group()
        out.append(0x20 if token == b"+" else int(token[1:], 16))
        pieces.append(found.span())
        pos = found.end()
    for i in range(pos, len(data)):
        out.append(data[i])
        pieces.append((i, i + 1))
    return bytes(out), pieces


def scan(masker: Masker, data: bytes, seen: SeenSecrets | None = None) -> list[Span]:
    """Every secret in an outbound body, query string or header value.

    Looks at the raw bytes, the percent-decoded bytes, JSON strings (escapes and base64
    values), and, with ``seen``, for values masked earlier in the session (any encoding).
    """
    spans = list(mask_json(masker, data).spans)
    if _PERCENT.search(data):
        decoded, pieces = percent_decode(data)
        for span in masker.scan(decoded):
            a, b = pieces[span.start][0], pieces[span.end - 1][1]
            spans.append(Span(a, b, span.rule, span.fingerprint))
    if seen is not None:
        spans.extend(seen.find(data))
        if _PERCENT.search(data):
            decoded, pieces = percent_decode(data)
            for span in seen.find(decoded):
                a, b = pieces[span.start][0], pieces[span.end - 1][1]
                spans.append(Span(a, b, span.rule, span.fingerprint))
    return merge_spans(spans, masker, data)
