"""Where rules' keywords occur: Hyperscan triggers (stream mode) or ``bytes.find`` probes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from proxy.masking.rules import Rule

if TYPE_CHECKING:
    from proxy.masking.engine import _Compiled

try:  # pragma: no cover - depends on the platform
    import hyperscan as hs
except ImportError:  # pragma: no cover
    hs = None


def hs_database(rules: list[Rule]) -> object:
    """One stream-mode database: rule ``i`` reports as id ``i``."""
    assert hs is not None
    expressions, flags = [], []
    for rule in rules:
        trigger = rule.trigger or "|".join(re.escape(k) for k in rule.keywords)
        expressions.append(trigger.encode())
        flag = hs.HS_FLAG_SOM_LEFTMOST
        # an explicit trigger spells its own case rules ((?i), [Aa]); keywords follow the rule
        caseless = rule.caseless and rule.trigger is None
        flags.append(flag | hs.HS_FLAG_CASELESS if caseless else flag)
    database = hs.Database(mode=hs.HS_MODE_STREAM | hs.HS_MODE_SOM_HORIZON_LARGE)
    try:
        database.compile(expressions=expressions, ids=list(range(len(rules))), flags=flags)
    except hs.error as exc:
        raise ValueError(f"a masking trigger does not compile in Hyperscan: {exc}") from exc
    return database


class AnchorIndex:
    """Every keyword occurrence of every rule (Python backend): ``bytes.find`` per probe.

    A probe is a lower-cased keyword no other keyword is a prefix of; a hit is checked
    against every keyword that starts with it (case-sensitively unless the rule is caseless).
    """

    def __init__(self, compiled: list[_Compiled]) -> None:
        words: dict[bytes, list[tuple[int, bytes, bool]]] = {}
        for comp in compiled:
            for keyword in comp.rule.keywords:
                raw = keyword.encode()
                words.setdefault(raw.lower(), []).append((comp.index, raw, comp.rule.caseless))
        self.longest = max((len(word) for word in words), default=1)
        probes = [w for w in words if not any(w != o and w.startswith(o) for o in words)]
        self.probes = [
            (
                probe,
                [
                    (entry, word)
                    for word, entries in words.items()
                    if word.startswith(probe)
                    for entry in entries
                ],
            )
            for probe in sorted(probes)
        ]
        self.prefixes = {word[:n] for word in words for n in range(1, len(word))}

    def find(self, buf: bytearray, start: int, end: int) -> list[tuple[int, int, int]]:
        """(rule, position, length) for every keyword entirely inside ``buf[start:end]``."""
        low = bytes(buf[start:end]).lower()
        found = []
        for probe, entries in self.probes:
            at = low.find(probe)
            while at != -1:
                for (rule, raw, caseless), word in entries:
                    if low.startswith(word, at) and (
                        caseless or buf[start + at : start + at + len(raw)] == raw
                    ):
                        found.append((rule, start + at, len(raw)))
                at = low.find(probe, at + 1)
        return found

    def partial_tail(self, buf: bytearray, end: int) -> int:
        """Length of the longest suffix of ``buf[:end]`` that could still become a keyword."""
        for size in range(min(self.longest - 1, end), 0, -1):
            if bytes(buf[end - size : end]).lower() in self.prefixes:
                return size
        return 0
