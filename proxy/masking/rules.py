"""Secret rules: what a secret looks like, where its issuer documents that, how to check it.

A rule finds a secret in two steps, so that the Hyperscan and the pure-Python backends
agree byte for byte (see ``engine.py``):

* ``keywords`` are literals that every match starts with (the *anchor*). The Python backend
  finds every occurrence; the Hyperscan backend finds those its ``trigger`` reports.
* ``trigger`` is a Hyperscan-compatible regex (open repeats only, no lookaround) that starts
  with a keyword and must match wherever ``pattern`` matches at that keyword. ``None``
  means the keywords themselves (caseless when the rule is). An explicit trigger is compiled
  case-sensitively: spell ``(?i)`` or ``[Aa]`` in it. It only decides where Python looks.
* ``pattern`` is a Python regex evaluated with ``re.match`` at each anchor, limited to
  ``max_len + 1`` bytes. It may use lookaround and bounded repeats. The secret is the first
  participating group named ``secret``, ``secret2`` or ``secret3``, else the whole match.
* ``stop`` is a regex searched after the keyword: once it is found, ``pattern`` cannot read
  past it, so a stream can decide the match without waiting for ``max_len`` bytes.
* ``fail`` is a regex matched at the keyword: when it matches, ``pattern`` cannot match
  there and reads nothing past it (the scheme after ``postgres`` is not ``://``...).
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Validator = Callable[[bytes], bool]

#: A stop regex must match within this many bytes, so a stream can rescan with overlap.
STOP_OVERLAP = 300


class RuleError(ValueError):
    """A rule (built-in or from config) that cannot be compiled or is inconsistent."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One kind of secret; the field docs are in the module docstring."""

    id: str
    description: str
    source: str
    pattern: str
    keywords: tuple[str, ...]
    trigger: str | None = None
    caseless: bool = False
    max_len: int = 256
    stop: str | None = None
    keep_prefix: int = 0
    validator: Validator | None = field(default=None, compare=False)
    reach: int | None = None
    fail: str | None = None

    @property
    def trigger_latency(self) -> int:
        """How far past its keyword's start a trigger can end: the stream's fixed holdback.

        ``reach`` states it for a trigger whose every accepted match is reported within that
        many bytes of the keyword (bounded repeats in ``pattern`` make that true).
        """
        if self.trigger is None:
            return max(len(k) for k in self.keywords)
        return self.reach if self.reach is not None else self.max_len + 1


# --- validators -------------------------------------------------------------------------

_BASE62 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def base62(number: int, width: int) -> bytes:
    """``number`` in base62 (``0-9A-Za-z``), left-padded with ``0`` to ``width``."""
    digits = bytearray()
    while number:
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    return bytes(reversed(digits)).rjust(width, b"0")


def crc32_base62_ok(body: bytes) -> bool:
    """GitHub/npm tokens: 30 random chars then the base62 CRC32 of those 30 chars."""
    if len(body) != 36:
        return False
    return base62(zlib.crc32(body[:30]), 6) == body[30:]


def shannon_entropy(data: bytes) -> float:
    """Bits per byte; random base62 of length 40 scores about 5, English words about 3."""
    if not data:
        return 0.0
    total = len(data)
    return -sum(n / total * math.log2(n / total) for n in Counter(data).values())


_PLACEHOLDER_WORDS = frozenset(
    b"""changeme change_me changeit password passw0rd passwd secret token apikey api_key
    redacted removed hidden masked null none nil true false undefined empty todo tbd fixme
    example sample dummy fake test testing placeholder default required optional string str
    bytes value values foo bar baz qux xxx yyy zzz abc abcdef 123456 12345678 123456789
    letmein admin root guest user username pass secretkey mysecret mytoken mypassword
    your_token your_secret your_password notasecret not_a_secret insecure""".split()
)
_PLACEHOLDER_RE = re.compile(
    rb"""(?ix)^(?:
        \$\{.*\}? | \$\(.*\)? | \$[A-Za-z_][A-Za-z0-9_]* | \{\{.*\}\}? | \{[A-Za-z0-9_.]*\}
      | %\(.*\)[sd]? | %[sd] | <.*>? | \[.*\] | @[A-Za-z_]+@ | __[A-Z_]+__
      | (?:x+|\*+|\.+|\#+|-+|_+|0+|1+)
      | your[_-]?.* | (?:my|the|some|enter|insert|put|add|replace)[_-].*
      | .*(?:_here|-here|example|placeholder|changeme|dummy|redacted|xxxx|\*\*\*|\.\.\.).*
      | (?:os\.environ|os\.getenv|getenv|process\.env|env\(|settings\.|config\.|self\.).*
    )$""",
)


def is_placeholder(value: bytes) -> bool:
    """Values that document where a secret goes rather than being one."""
    stripped = value.strip()
    if not stripped:
        return True
    if stripped.lower() in _PLACEHOLDER_WORDS:
        return True
    if len(set(stripped)) <= 2:
        return True
    return _PLACEHOLDER_RE.match(stripped) is not None


def entropy_floor(bits: float, *, min_len: int = 1) -> Validator:
    """Reject placeholders, short values and values with less than ``bits`` per byte."""

    def check(value: bytes) -> bool:
        return (
            len(value) >= min_len and not is_placeholder(value) and shannon_entropy(value) >= bits
        )

    return check


def all_of(*checks: Validator | None) -> Validator:
    """Combine validators; ``None`` entries are skipped."""
    active = [check for check in checks if check is not None]

    def check(value: bytes) -> bool:
        return all(one(value) for one in active)

    return check


# --- building rules ---------------------------------------------------------------------


def token_rule(
    rule_id: str,
    description: str,
    source: str,
    prefixes: Sequence[str],
    body: str,
    *,
    count: str = "+",
    keep: int | None = None,
    max_len: int = 256,
    validator: Validator | None = None,
    boundary: bool = True,
) -> Rule:
    """A fixed public prefix followed by a run of ``body`` characters (a regex class body).

    The run must end at a character outside ``body`` (or the end of data); ``count`` is
    the Python repeat for the run, e.g. ``{36}`` or ``{20,}``.
    """
    alternation = "|".join(re.escape(prefix) for prefix in prefixes)
    lead = r"\b" if boundary else ""
    pattern = rf"{lead}(?:{alternation})[{body}]{count}(?![{body}])"
    return Rule(
        id=rule_id,
        description=description,
        source=source,
        pattern=pattern,
        keywords=tuple(prefixes),
        max_len=max_len,
        stop=rf"[^{body}]",
        keep_prefix=min(len(p) for p in prefixes) if keep is None else keep,
        validator=validator,
    )


def compile_pattern(rule: Rule) -> re.Pattern[bytes]:
    flags = re.IGNORECASE if rule.caseless else 0
    try:
        return re.compile(rule.pattern.encode(), flags)
    except re.error as exc:
        raise RuleError(f"rule {rule.id}: bad pattern: {exc}") from exc


def check_rule(rule: Rule) -> None:
    """Catch inconsistent rules early; the engine relies on every one of these facts."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", rule.id):
        raise RuleError(f"rule id {rule.id!r}: letters, digits, '_', '.', '-' only")
    if not rule.keywords or any(len(k) < 2 or not k.isascii() for k in rule.keywords):
        raise RuleError(f"rule {rule.id}: needs ASCII keywords of at least 2 characters")
    lowered = [k.lower() for k in rule.keywords]
    if any(a != b and b.startswith(a) for a in lowered for b in lowered):
        # one keyword per position keeps "where the stop search starts" well defined
        raise RuleError(f"rule {rule.id}: no keyword may be a prefix of another")
    if not 8 <= rule.max_len <= 65536:
        raise RuleError(f"rule {rule.id}: max_len must be between 8 and 65536")
    if rule.keep_prefix < 0:
        raise RuleError(f"rule {rule.id}: keep_prefix must not be negative")
    compile_pattern(rule)
    for name, regex in (("stop", rule.stop), ("fail", rule.fail)):
        if regex is not None:
            try:
                re.compile(regex.encode())
            except re.error as exc:
                raise RuleError(f"rule {rule.id}: bad {name} regex: {exc}") from exc


# --- configuration ----------------------------------------------------------------------


def custom_rule(spec: Mapping[str, object]) -> Rule:
    """A user rule: ``id``, ``regex``, ``keywords`` and optional ``entropy``, ``keep_prefix``,
    ``max_len``, ``caseless``, ``description``.

    The regex must match starting at one of the keywords (it is tried at each keyword
    occurrence); the Hyperscan trigger is the keywords themselves, which is always sound.
    """
    known = {"id", "regex", "keywords", "entropy", "keep_prefix", "max_len", "caseless"}
    unknown = set(spec) - known - {"description"}
    if unknown:
        raise RuleError(f"custom masking rule: unknown keys {sorted(unknown)}")
    rule_id, regex, keywords = spec.get("id"), spec.get("regex"), spec.get("keywords")
    if not isinstance(rule_id, str) or not isinstance(regex, str) or not regex:
        raise RuleError("custom masking rule: 'id' and 'regex' must be non-empty strings")
    if isinstance(keywords, str):
        keywords = [keywords]
    if not isinstance(keywords, list) or not all(isinstance(k, str) for k in keywords):
        raise RuleError(f"rule {rule_id}: 'keywords' must be a list of strings")
    entropy = spec.get("entropy")
    if entropy is not None and not isinstance(entropy, int | float):
        raise RuleError(f"rule {rule_id}: 'entropy' must be a number (bits per byte)")
    keep, max_len = spec.get("keep_prefix", 0), spec.get("max_len", 256)
    if not isinstance(keep, int) or not isinstance(max_len, int):
        raise RuleError(f"rule {rule_id}: 'keep_prefix' and 'max_len' must be integers")
    caseless = bool(spec.get("caseless", False))
    lead = "|".join(re.escape(k) for k in keywords)
    rule = Rule(
        id=rule_id,
        description=str(spec.get("description", "custom rule")),
        source="config",
        pattern=f"(?=(?:{lead}))(?:{regex})",
        keywords=tuple(keywords),
        caseless=caseless,
        max_len=max_len,
        keep_prefix=keep,
        validator=None if entropy is None else entropy_floor(float(entropy)),
    )
    check_rule(rule)
    return rule


def select_rules(
    builtin: Iterable[Rule],
    *,
    enabled: bool = True,
    disable: Iterable[str] = (),
    custom: Iterable[Mapping[str, object]] = (),
) -> list[Rule]:
    """Apply the ``[masking]`` config: ``enabled``, ``disable = [ids]``, ``[[masking.rules]]``."""
    if not enabled:
        return []
    rules = list(builtin)
    known = {rule.id for rule in rules}
    disabled = set(disable)
    missing = disabled - known
    if missing:
        raise RuleError(f"masking.disable names unknown rules: {sorted(missing)}")
    selected = [rule for rule in rules if rule.id not in disabled]
    for spec in custom:
        rule = custom_rule(spec)
        if rule.id in known:
            raise RuleError(f"custom masking rule {rule.id!r} reuses a built-in rule id")
        known.add(rule.id)
        selected.append(rule)
    return selected
