"""Secrets masked earlier in a session, remembered only as keyed fingerprints.

An agent that was shown ``ghp_****`` should never be able to send the real token out later,
whether it found the value elsewhere or guessed at an encoding. ``SeenSecrets`` keeps the
HMAC of each masked value and of its base64 and percent-encoded forms, never the value, and
``find`` checks the delimited runs of an outbound body, query string or header against them.
"""

from __future__ import annotations

import base64
import hmac
import re
from collections import OrderedDict
from hashlib import sha256
from urllib.parse import quote_from_bytes

from proxy.masking.engine import Span

SEEN_RULE = "seen-secret"
#: Runs between these bytes are candidates; the second set also splits URLs and pairs.
_COARSE = re.compile(rb"[^\s\"'<>(){}\[\],;&=\\`|]+")
_FINE = re.compile(rb"[^\s\"'<>(){}\[\],;&=\\`|:/?#@]+")


def encoded_forms(secret: bytes) -> set[bytes]:
    """The spellings an outbound request may carry: raw, base64 (std/url, padded or not),
    percent-encoded."""
    forms = {secret}
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(secret)
        forms.update({encoded, encoded.rstrip(b"=")})
    forms.add(quote_from_bytes(secret, safe="").encode())
    return forms


class SeenSecrets:
    """A bounded per-session set of fingerprints; the oldest entries go first."""

    def __init__(self, hmac_key: bytes, *, max_secrets: int = 10000, min_len: int = 8) -> None:
        self._key = hmac_key
        self._max = max_secrets
        self._min = min_len
        self._secrets: OrderedDict[str, list[str]] = OrderedDict()  # fingerprint -> form fps
        self._forms: dict[str, str] = {}  # form fingerprint -> secret fingerprint
        self._lengths: dict[int, int] = {}

    def _fingerprint(self, data: bytes) -> str:
        return hmac.new(self._key, data, sha256).hexdigest()[:32]

    def __len__(self) -> int:
        return len(self._secrets)

    def add(self, secret: bytes) -> None:
        """Remember ``secret`` (the engine calls this for every value it masks)."""
        if len(secret) < self._min:
            return
        key = self._fingerprint(secret)
        if key in self._secrets:
            self._secrets.move_to_end(key)
            return
        forms = []
        for form in encoded_forms(secret):
            fp = self._fingerprint(form)
            self._forms[fp] = key
            self._lengths[len(form)] = self._lengths.get(len(form), 0) + 1
            forms.append(f"{len(form)}:{fp}")
        self._secrets[key] = forms
        while len(self._secrets) > self._max:
            _, old = self._secrets.popitem(last=False)
            for entry in old:
                size, fp = entry.split(":", 1)
                self._forms.pop(fp, None)
                self._lengths[int(size)] -= 1
                if not self._lengths[int(size)]:
                    del self._lengths[int(size)]

    def find(self, data: bytes) -> list[Span]:
        """Spans of ``data`` that spell a remembered secret; fingerprint = the secret's own."""
        if not self._secrets:
            return []
        spans: dict[tuple[int, int], Span] = {}
        lengths = self._lengths
        for regex in (_COARSE, _FINE):
            for run in regex.finditer(data):
                start, end = run.span()
                for size in lengths:
                    if size > end - start:
                        continue
                    # the run itself, or a prefix/suffix of it (a token glued to a separator)
                    for a in {start, end - size}:
                        fp = self._fingerprint(data[a : a + size])
                        if fp in self._forms:
                            spans[(a, a + size)] = Span(
                                a, a + size, SEEN_RULE, self._forms[fp][:16]
                            )
        return sorted(spans.values(), key=lambda s: (s.start, -s.end))
