"""Same-length secret masking for whole bodies and streams, with two identical backends.

API
---
``Masker(rules=None, *, hmac_key, backend="auto")``
    ``rules`` defaults to ``builtin_rules()``; ``backend`` is ``"hyperscan"``, ``"python"``
    or ``"auto"`` (Hyperscan when it imports). Thread-safe: each thread gets its own scratch.
``Masker.mask_bytes(data, seen=None) -> MaskResult(masked, spans)``
``Masker.scan(data) -> list[Span]``: spans only, for outbound request checks.
``Masker.stream(seen=None) -> MaskStream``
    ``feed(chunk) -> bytes``: what is safe to release now; ``flush_idle() -> bytes``: also
    release what cannot begin a secret (call when the stream has gone quiet);
    ``finish() -> bytes``: the rest; ``spans``: final spans so far, offsets in the whole
    stream; ``held``: bytes held back; ``open_from``: offset of the earliest undecided
    keyword (``None`` if none); ``total``: bytes fed. ``close()`` abandons a stream.
``Span(start, end, rule, fingerprint)``: ``start:end`` is the secret (the rule's public
    prefix included, left visible); ``fingerprint`` is HMAC-SHA256(hmac_key, secret) as 16
    hex digits. Secrets themselves are never stored.

Masking replaces bytes with ``*`` one for one (line breaks inside a secret, as in a PEM
block, are kept), so offsets and ``Content-Length`` survive.
Overlapping matches merge into one span (their union); it is named after the match that
starts first, then the longest, then the rule listed first.

How both backends agree (see ``rules.py``): a match is ``pattern.match(data, p, p+max_len+1)``
at a keyword occurrence ``p``. The Python backend tries every keyword occurrence; Hyperscan
runs each rule's trigger in stream mode (leftmost start) and the keywords inside a reported
match are tried. A trigger matches wherever its pattern does, so both try every keyword
that can match and the same code decides. The stream holds back the longest trigger reach
plus, from each undecided keyword on, until its rule's ``stop`` shows up (PEM blocks hold
back only when one is open) or ``max_len`` bytes have arrived.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import threading
from dataclasses import dataclass
from hashlib import sha256
from typing import Literal, Protocol

from proxy.masking import keywords
from proxy.masking.builtin import builtin_rules
from proxy.masking.keywords import AnchorIndex, hs_database
from proxy.masking.rules import STOP_OVERLAP, Rule, check_rule, compile_pattern

MASK = ord("*")
#: Masking keeps line breaks, so a masked PEM block keeps its shape; every other byte is ``*``.
_MASK_TABLE = bytes(b if b in (10, 13) else MASK for b in range(256))
_CONTEXT = 16  # bytes kept before the release point, for \b and lookbehind at a keyword
Backend = Literal["auto", "hyperscan", "python"]


class SecretSink(Protocol):
    """Receives each secret masked, e.g. ``SeenSecrets`` for outbound checks."""

    def add(self, secret: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int
    rule: str
    fingerprint: str

    def as_dict(self) -> dict[str, object]:
        return {
            "start": self.start,
            "end": self.end,
            "rule": self.rule,
            "fingerprint": self.fingerprint,
        }


@dataclass(frozen=True, slots=True)
class MaskResult:
    masked: bytes
    spans: list[Span]


@dataclass(slots=True)
class _Compiled:
    index: int
    rule: Rule
    pattern: re.Pattern[bytes]
    keyword_re: re.Pattern[bytes]
    stop: re.Pattern[bytes] | None
    fail: re.Pattern[bytes] | None
    window: int
    groups: tuple[str, ...]
    keyword_max: int


@dataclass(slots=True)
class _Match:
    start: int
    end: int
    mask_from: int
    rule: int


def hyperscan_available() -> bool:
    return keywords.hs is not None


class Masker:
    """Compiled rules plus the backend that finds their keywords."""

    def __init__(
        self, rules: list[Rule] | None = None, *, hmac_key: bytes, backend: Backend = "auto"
    ) -> None:
        if not hmac_key:
            raise ValueError("hmac_key must not be empty")
        self.rules = builtin_rules() if rules is None else list(rules)
        ids = [rule.id for rule in self.rules]
        if len(set(ids)) != len(ids):
            raise ValueError("rule ids must be unique")
        for rule in self.rules:
            check_rule(rule)
        if backend == "auto":
            backend = "hyperscan" if keywords.hs is not None else "python"
        if backend == "hyperscan" and keywords.hs is None:
            raise RuntimeError("the hyperscan package is not installed")
        self.backend: Backend = backend
        self._key = hmac_key
        self.compiled = [_compile(i, rule) for i, rule in enumerate(self.rules)]
        self.holdback = max((rule.trigger_latency for rule in self.rules), default=0)
        self._anchors = AnchorIndex(self.compiled)
        self._hs_db = hs_database(self.rules) if backend == "hyperscan" and self.rules else None
        self._local = threading.local()
        self._close_lock = threading.Lock()

    def fingerprint(self, secret: bytes) -> str:
        return hmac.new(self._key, secret, sha256).hexdigest()[:16]

    def stream(self, seen: SecretSink | None = None) -> MaskStream:
        return MaskStream(self, seen)

    def mask_bytes(self, data: bytes, seen: SecretSink | None = None) -> MaskResult:
        stream = self.stream(seen)
        masked = stream.feed(data) + stream.finish()
        return MaskResult(masked, stream.spans)

    def scan(self, data: bytes) -> list[Span]:
        return self.mask_bytes(data).spans

    def _close_hs(self, stream: object) -> None:
        # hyperscan 0.9.1's Stream.close(scratch=...) mis-parses its arguments, so closing
        # always uses the database's own scratch: serialise that.
        with self._close_lock:
            stream.close()  # type: ignore[attr-defined]

    def _scratch(self) -> object:
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = self._hs_db.scratch.clone()  # type: ignore[union-attr]
        return scratch


def _compile(index: int, rule: Rule) -> _Compiled:
    flags = re.IGNORECASE if rule.caseless else 0
    alternation = b"|".join(re.escape(k.encode()) for k in rule.keywords)
    pattern = compile_pattern(rule)
    groups = tuple(g for g in ("secret", "secret2", "secret3") if g in pattern.groupindex)
    return _Compiled(
        index=index,
        rule=rule,
        pattern=pattern,
        keyword_re=re.compile(b"(?=(" + alternation + b"))", flags),
        stop=re.compile(rule.stop.encode()) if rule.stop else None,
        fail=re.compile(rule.fail.encode()) if rule.fail else None,
        window=rule.max_len + 1,
        groups=groups,
        keyword_max=max(len(k) for k in rule.keywords),
    )


class MaskStream:
    """Incremental masking; the concatenated output equals ``mask_bytes`` of the whole."""

    def __init__(self, masker: Masker, seen: SecretSink | None) -> None:
        self._m = masker
        self._seen = seen
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._total = 0
        self._released = 0
        self._pending: list[list[int]] = []  # [position, rule, stop search start, scanned to]
        self._tried: set[tuple[int, int]] = set()
        self._matches: list[_Match] = []
        self._done = False
        self.spans: list[Span] = []
        self._hs_stream: object | None = None
        self._events: list[tuple[int, int, int]] = []
        if masker._hs_db is not None:
            self._on_match = self._record  # a live reference: hyperscan keeps a borrowed one
            self._hs_stream = masker._hs_db.stream(match_event_handler=self._on_match)  # type: ignore[attr-defined]
            self._hs_stream.__enter__()  # type: ignore[attr-defined]

    @property
    def held(self) -> int:
        """Bytes received but not yet released."""
        return self._total - self._released

    @property
    def total(self) -> int:
        return self._total

    @property
    def open_from(self) -> int | None:
        """Offset of the earliest keyword whose match is still undecided, if any."""
        return min((cand[0] for cand in self._pending), default=None)

    def _record(self, rule: int, start: int, end: int, flags: int, context: object) -> None:
        self._events.append((rule, start, end))

    def feed(self, chunk: bytes) -> bytes:
        if self._done:
            raise RuntimeError("feed() after finish()")
        if not chunk:
            return b""
        start = self._total
        self._buf += chunk
        self._total += len(chunk)
        if self._hs_stream is not None:
            self._hs_stream.scan(chunk, scratch=self._m._scratch())  # type: ignore[attr-defined]
            self._take_events()
        else:
            lo = max(start - self._m._anchors.longest + 1, self._released)
            self._find_keywords(lo)
        self._decide(final=False)
        return self._release(self._total - self._m.holdback)

    def flush_idle(self) -> bytes:
        """Release everything before the first keyword that could still start a secret."""
        if self._done:
            return b""
        self._find_keywords(self._released)
        self._decide(final=False)
        limit = self._total - self._m._anchors.partial_tail(self._buf, self._total - self._base)
        return self._release(limit)

    def finish(self) -> bytes:
        if self._done:
            return b""
        if self._hs_stream is not None:
            self._m._close_hs(self._hs_stream)
            self._take_events()
            self._hs_stream = None
        self._decide(final=True)
        out = self._release(self._total, final=True)
        self._done = True
        return out

    def close(self) -> None:
        """Abandon the stream without output (frees the Hyperscan stream)."""
        if self._hs_stream is not None:
            self._m._close_hs(self._hs_stream)
            self._hs_stream = None
        self._done = True
        self._buf.clear()

    def __del__(self) -> None:
        if getattr(self, "_hs_stream", None) is not None:
            self._events = []
            with contextlib.suppress(Exception):  # interpreter shutdown, mostly
                self.close()

    def _find_keywords(self, start: int) -> None:
        base = self._base
        found = self._m._anchors.find(self._buf, start - base, self._total - base)
        self._queue([(rule, position + base, size) for rule, position, size in found])

    def _take_events(self) -> None:
        events, self._events = self._events, []
        base = self._base
        for rule, start, end in events:
            lo = max(start, self._released) - base
            hits = self._m.compiled[rule].keyword_re.finditer(self._buf, lo, end - base)
            self._queue([(rule, hit.start() + base, len(hit.group(1))) for hit in hits])

    def _queue(self, found: list[tuple[int, int, int]]) -> None:
        for rule, position, size in found:
            if position < self._released or (position, rule) in self._tried:
                continue
            self._tried.add((position, rule))
            self._pending.append([position, rule, position + size, position + size])

    def _decide(self, *, final: bool) -> None:
        """Evaluate every pending keyword whose outcome can no longer change."""
        keep = []
        for cand in self._pending:
            position, rule, after, scanned = cand
            comp = self._m.compiled[rule]
            ready = final or self._total >= position + comp.window
            if not ready and comp.fail is not None:
                lo, hi = position - self._base, self._total - self._base
                ready = comp.fail.match(self._buf, lo, hi) is not None
            if not ready and comp.stop is not None and self._total > after:
                lo = max(scanned - STOP_OVERLAP, after) - self._base
                ready = comp.stop.search(self._buf, lo, self._total - self._base) is not None
                cand[3] = self._total
            if ready:
                self._evaluate(comp, position)
            else:
                keep.append(cand)
        self._pending = keep

    def _evaluate(self, comp: _Compiled, position: int) -> None:
        base = self._base
        end = min(position + comp.window, self._total)
        found = comp.pattern.match(self._buf, position - base, end - base)
        if found is None or found.end() + base - position > comp.rule.max_len:
            return
        start, stop = found.span()
        for group in comp.groups:
            if found.start(group) >= 0:
                start, stop = found.span(group)
                break
        secret = bytes(self._buf[start:stop])
        if comp.rule.validator is not None and not comp.rule.validator(secret):
            return
        if start + comp.rule.keep_prefix >= stop:
            return
        self._matches.append(
            _Match(start + base, stop + base, start + base + comp.rule.keep_prefix, comp.index)
        )
        if self._seen is not None:
            self._seen.add(secret)

    def _release(self, limit: int, *, final: bool = False) -> bytes:
        if not final and self._pending:
            limit = min(limit, min(cand[0] for cand in self._pending))
        if limit <= self._released:
            return b""
        lo, base = self._released, self._base
        out = bytearray(self._buf[lo - base : limit - base])
        for match in self._matches:
            a, b = max(match.mask_from, lo), min(match.end, limit)
            if a < b:
                out[a - lo : b - lo] = out[a - lo : b - lo].translate(_MASK_TABLE)
        self._released = limit
        self._close_spans(limit)
        self._trim()
        return bytes(out)

    def _close_spans(self, limit: int) -> None:
        """Merge overlapping matches; a merged span ending by ``limit`` can no longer grow."""
        if not self._matches:
            return
        order = sorted(self._matches, key=lambda m: (m.start, -m.end, m.rule))
        groups: list[list[_Match]] = []
        for match in order:
            if groups and match.start < max(m.end for m in groups[-1]):
                groups[-1].append(match)
            else:
                groups.append([match])
        self._matches = []
        for group in groups:
            end = max(m.end for m in group)
            if end > limit:
                self._matches.extend(group)
                continue
            start = group[0].start
            secret = bytes(self._buf[start - self._base : end - self._base])
            rule = self._m.rules[group[0].rule].id
            self.spans.append(Span(start, end, rule, self._m.fingerprint(secret)))

    def _trim(self) -> None:
        keep_from = min([self._released - _CONTEXT] + [m.start for m in self._matches])
        drop = keep_from - self._base
        if drop > 65536 or (drop > 0 and drop * 2 > len(self._buf)):
            del self._buf[:drop]
            self._base = keep_from
            self._tried = {t for t in self._tried if t[0] >= self._released}
