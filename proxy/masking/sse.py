"""Server-sent events: mask secrets that an LLM streams out a few characters per event.

The text of consecutive ``data:`` events is joined per *channel* before masking: for JSON
payloads a channel is the JSON path of a string value (``choices/0/delta/content``,
``delta/text``), so a token split over many deltas is seen whole; other payloads form one
raw channel. Each channel runs through its own ``MaskStream``; a raw event line is released
once every byte it contributed has been released, with the masked characters starred in
place (JSON escapes included), so the stream stays valid SSE and keeps its length.
Secrets in ``event:``, ``id:`` and comment lines are not looked for.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from proxy.masking.encodings import unescape_json
from proxy.masking.engine import Masker, MaskStream, SecretSink, Span

_TOKEN = re.compile(rb'[ \t\r\n]*(?:"((?:[^"\\]|\\.)*)"|([{}\[\]:,])|([^ \t\r\n{}\[\]:,"]+))')
_KEEP_ORIGINS = 65536


@dataclass(slots=True)
class _Piece:
    raw: bytearray
    offset: int
    waiting: int = 0


@dataclass(slots=True)
class _Channel:
    stream: MaskStream
    origins: list[tuple[_Piece, int, int]] = field(default_factory=list)  # per channel byte
    original: bytearray = field(default_factory=bytearray)
    base: int = 0  # channel offset of origins[0] and original[0]
    released: int = 0
    spans_seen: int = 0


def json_strings(value: bytes) -> list[tuple[str, int, int]] | None:
    """(path, start, end) of every string value in a JSON text; None if it is not JSON."""
    if value.lstrip()[:1] not in (b"{", b"["):
        return None
    stack: list[list[object]] = []
    expect_key = False
    found: list[tuple[str, int, int]] = []
    pos = 0
    while pos < len(value):
        token = _TOKEN.match(value, pos)
        if token is None:
            if value[pos:].strip():
                return None
            break
        pos = token.end()
        string, punct = token.group(1), token.group(2)
        if punct in (b"{", b"["):
            stack.append(["{" if punct == b"{" else "[", 0 if punct == b"[" else ""])
            expect_key = punct == b"{"
        elif punct in (b"}", b"]"):
            if not stack:
                return None
            stack.pop()
        elif punct == b":":
            expect_key = False
        elif punct == b",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] = int(stack[-1][1]) + 1  # type: ignore[call-overload]
            expect_key = bool(stack) and stack[-1][0] == "{"
        elif string is not None:
            if stack and stack[-1][0] == "{" and expect_key:
                stack[-1][1] = string.decode("utf-8", "replace")
            else:
                path = "/".join(str(entry[1]) for entry in stack)
                found.append((path, token.start(1), token.end(1)))
    return found


class SseMasker:
    """``feed`` / ``flush_idle`` / ``finish`` like ``MaskStream``, for ``text/event-stream``."""

    def __init__(
        self, masker: Masker, seen: SecretSink | None = None, *, max_line: int = 1 << 20
    ) -> None:
        self._masker = masker
        self._seen = seen
        self._max_line = max_line
        self._partial = bytearray()
        self._offset = 0  # stream offset of the next line
        self._pieces: deque[_Piece] = deque()
        self._channels: dict[str, _Channel] = {}
        self.spans: list[Span] = []

    def feed(self, chunk: bytes) -> bytes:
        self._partial += chunk
        start = 0
        for found in re.finditer(rb"\r\n|\n|\r(?!\Z)", self._partial):
            self._line(bytes(self._partial[start : found.end()]), found.end() - found.start())
            start = found.end()
        del self._partial[:start]
        if len(self._partial) > self._max_line:  # a runaway line: treat what we have as a line
            self._line(bytes(self._partial), 0)
            self._partial.clear()
        return self._emit()

    def flush_idle(self) -> bytes:
        for channel in self._channels.values():
            self._released(channel, channel.stream.flush_idle())
        return self._emit()

    def finish(self) -> bytes:
        if self._partial:
            self._line(bytes(self._partial), 0)
            self._partial.clear()
        for channel in self._channels.values():
            self._released(channel, channel.stream.finish())
        out = self._emit()
        self.spans.sort(key=lambda s: (s.start, -s.end))
        return out

    def _line(self, line: bytes, ending: int) -> None:
        piece = _Piece(bytearray(line), self._offset)
        self._offset += len(line)
        self._pieces.append(piece)
        if not line.startswith(b"data:"):
            return
        start = 6 if line[5:6] == b" " else 5
        value = line[start : len(line) - ending]
        strings = json_strings(value)
        if strings is None:
            self._to_channel(
                "", value, [(start + i, start + i + 1) for i in range(len(value))], piece
            )
            return
        for path, a, b in strings:
            try:
                decoded, pieces = unescape_json(value[a:b])
            except ValueError:
                continue
            spots = [(start + a + x, start + a + y) for x, y in pieces]
            self._to_channel(path, decoded, spots, piece)

    def _to_channel(
        self, name: str, data: bytes, spots: list[tuple[int, int]], piece: _Piece
    ) -> None:
        if not data:
            return
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel(self._masker.stream(self._seen))
        channel.origins.extend((piece, piece.offset + x, piece.offset + y) for x, y in spots)
        channel.original += data
        piece.waiting += len(data)
        self._released(channel, channel.stream.feed(data))

    def _released(self, channel: _Channel, out: bytes) -> None:
        lo = channel.released - channel.base
        for i, byte in enumerate(out):
            piece, a, b = channel.origins[lo + i]
            if byte != channel.original[lo + i]:
                piece.raw[a - piece.offset : b - piece.offset] = b"*" * (b - a)
            piece.waiting -= 1
        channel.released += len(out)
        spans = channel.stream.spans
        for span in spans[channel.spans_seen :]:
            first = max(span.start - channel.base, 0)
            last = max(span.end - 1 - channel.base, 0)
            start, end = channel.origins[first][1], channel.origins[last][2]
            self.spans.append(Span(start, end, span.rule, span.fingerprint))
        channel.spans_seen = len(spans)
        drop = channel.released - _KEEP_ORIGINS - channel.base
        if drop > _KEEP_ORIGINS:
            del channel.origins[:drop]
            del channel.original[:drop]
            channel.base += drop

    def _emit(self) -> bytes:
        out = []
        while self._pieces and self._pieces[0].waiting == 0:
            out.append(bytes(self._pieces.popleft().raw))
        return b"".join(out)
