"""The one matcher language: policy rules (TOML tables) and console filters (typed text).

A matcher is a conjunction of field predicates over ``Facts``. Policy rules and console
filter expressions compile through the same field table, so ``path = "**/.env"`` in a rule
and ``path:**/.env`` in the filter bar mean exactly the same thing.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from wcmatch import fnmatch, glob

PATH_FLAGS = glob.GLOBSTAR | glob.DOTGLOB
NAME_FLAGS = fnmatch.DOTMATCH
NOCASE_FLAGS = fnmatch.DOTMATCH | fnmatch.IGNORECASE

#: Fields only known once a response exists: console filters may use them, policy may not.
FLOW_ONLY_FIELDS = frozenset({"status", "decision", "rule"})
FIELDS = (
    frozenset(
        {
            "method",
            "target",
            "path",
            "host",
            "port",
            "query",
            "header",
            "subject",
            "groups",
            "content_type",
            "carries_secret",
            "body",
        }
    )
    | FLOW_ONLY_FIELDS
)


@dataclass(frozen=True, slots=True)
class Facts:
    """What a matcher can see of a request (and, for console filters, of its outcome)."""

    method: str = ""
    target: str | None = None
    path: str = "/"
    query: str = ""
    #: The Host header for target requests; the destination host for forward requests.
    host: str = ""
    #: The destination port of forward requests (None for target requests).
    port: int | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    subject: str | None = None
    groups: tuple[str, ...] = ()
    content_type: str = ""
    body: bytes | None = None
    status: int | None = None
    decision: str | None = None
    rule: str | None = None
    #: Whether the request carries a secret (body, query or headers); None: not scanned yet.
    carries_secret: bool | None = None


class MatcherError(ValueError):
    """A field that cannot be compiled; ``field`` names it and ``position`` locates filter text."""

    def __init__(self, field_name: str, message: str, position: int | None = None) -> None:
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.message = message
        self.position = position


class BodyNotLoaded(Exception):
    """Raised when a body predicate is asked before the body was read."""


Predicate = Callable[[Facts], bool]


@dataclass(frozen=True, slots=True)
class Matcher:
    """All predicates must hold; an empty matcher matches everything."""

    predicates: tuple[Predicate, ...] = ()
    body_pattern: re.Pattern[bytes] | None = None
    body_negated: bool = False
    fields: tuple[str, ...] = ()
    #: ``carries_secret = true|false``: needs the outbound scan, which needs the body.
    secret_wanted: bool | None = None
    #: Exact target names / methods this matcher is limited to (None: any), so a policy
    #: can skip it without calling a predicate. The predicates still check them too.
    targets: frozenset[str] | None = None
    methods: frozenset[str] | None = None
    #: Exact (glob-free) host names the rule lists: such a rule names a destination
    #: explicitly, which is what lets a forward request reach a private address.
    hosts: frozenset[str] | None = None

    @property
    def needs_body(self) -> bool:
        return self.body_pattern is not None or self.secret_wanted is not None

    def matches_head(self, facts: Facts) -> bool:
        """Everything but the body: decides whether reading the body is worth it."""
        for predicate in self.predicates:  # noqa: SIM110 - faster than all(genexpr) here
            if not predicate(facts):
                return False
        return True

    def matches(self, facts: Facts) -> bool:
        if not self.matches_head(facts):
            return False
        if self.secret_wanted is not None:
            if facts.carries_secret is None:
                raise BodyNotLoaded
            if facts.carries_secret is not self.secret_wanted:
                return False
        if self.body_pattern is None:
            return True
        if facts.body is None:
            raise BodyNotLoaded
        return (self.body_pattern.search(facts.body) is not None) != self.body_negated


def _as_list(field_name: str, value: object) -> list[str]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise MatcherError(field_name, "expected a string or a non-empty list of strings")
    for item in values:
        if not isinstance(item, str) or not item.strip():
            raise MatcherError(field_name, f"expected non-empty strings, got {item!r}")
        if "\x00" in item:
            raise MatcherError(field_name, "NUL characters are not allowed")
    return values


def _check_brackets(field_name: str, pattern: str) -> None:
    depth = 0
    escaped = False
    for char in pattern:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True  # ``\[`` is a literal bracket, as glob.escape writes it
        elif char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
    if depth:
        raise MatcherError(field_name, f"unclosed '[' in glob {pattern!r}")


def _normalise_path_glob(field_name: str, pattern: str) -> str:
    _check_brackets(field_name, pattern)
    return pattern if pattern.startswith(("/", "**")) else "/" + pattern


def compile_path_globs(field_name: str, value: object) -> re.Pattern[str]:
    """Path globs: ``*`` stays within a segment, ``**`` spans segments, leading ``/`` implied."""
    patterns = []
    for pattern in _as_list(field_name, value):
        patterns.extend(
            glob.translate(_normalise_path_glob(field_name, pattern), flags=PATH_FLAGS)[0]
        )
    return re.compile("|".join(patterns))


_GLOB_SYNTAX = re.compile(r"\[[^\]]*\]|[*?]")


def required_literal(pattern: str) -> str:
    """The longest literal run every match of a glob must contain ("" if none is safe).

    A cheap ``in`` test on it skips the glob's regex for the many paths that cannot match.
    """
    if "\\" in pattern or "{" in pattern:
        return ""
    return max(_GLOB_SYNTAX.split(pattern), key=len)


def _path_predicate(value: object) -> Predicate:
    pattern = compile_path_globs("path", value)
    literals = [
        required_literal(_normalise_path_glob("path", item)) for item in _as_list("path", value)
    ]
    if "" in literals:
        return lambda facts: pattern.fullmatch(facts.path) is not None
    hints = tuple(dict.fromkeys(literals))

    def match_path(facts: Facts) -> bool:
        path = facts.path
        for hint in hints:
            if hint in path:
                return pattern.fullmatch(path) is not None
        return False

    return match_path


def compile_name_globs(field_name: str, value: object, *, nocase: bool) -> re.Pattern[str]:
    patterns = []
    for pattern in _as_list(field_name, value):
        _check_brackets(field_name, pattern)
        patterns.extend(fnmatch.translate(pattern, flags=NOCASE_FLAGS if nocase else NAME_FLAGS)[0])
    return re.compile("|".join(patterns))


#: A host glob spelled with digits, dots and wildcards only (``10.*``, ``192.168.?.*``).
_ADDRESS_GLOB = re.compile(r"^[0-9*?]+(\.[0-9*?]+)*$")


def compile_host_globs(field_name: str, value: object) -> Callable[[str], bool]:
    """Host globs, case-insensitive. One spelled like an IPv4 address (``10.*``) matches
    addresses only: ``10.*`` must not let ``10.attacker.com`` through."""
    names: list[str] = []
    addresses: list[str] = []
    for pattern in _as_list(field_name, value):
        spelled_as_address = _ADDRESS_GLOB.match(pattern) and any(c.isdigit() for c in pattern)
        (addresses if spelled_as_address else names).append(pattern)
    by_name = compile_name_globs(field_name, names, nocase=True) if names else None
    by_address = compile_name_globs(field_name, addresses, nocase=True) if addresses else None

    def matches(host: str) -> bool:
        if by_name is not None and by_name.fullmatch(host) is not None:
            return True
        return by_address is not None and by_address.fullmatch(host) is not None and _ipv4(host)

    return matches


def _ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


_STATUS_RANGE = re.compile(r"^(\d)xx$", re.IGNORECASE)
_STATUS_CMP = re.compile(r"^(>=|<=|>|<|=)?\s*(\d{3})$")
_STATUS_SPAN = re.compile(r"^(\d{3})-(\d{3})$")
_COMPARE: dict[str, Callable[[int, int], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
    "=": lambda a, b: a == b,
}


def _status_test(text: str) -> Callable[[int], bool]:
    text = text.strip()
    if match := _STATUS_RANGE.match(text):
        hundred = int(match.group(1))
        return lambda status: status // 100 == hundred
    if match := _STATUS_SPAN.match(text):
        low, high = int(match.group(1)), int(match.group(2))
        return lambda status: low <= status <= high
    if match := _STATUS_CMP.match(text):
        compare, code = _COMPARE[match.group(1) or "="], int(match.group(2))
        return lambda status: compare(status, code)
    raise MatcherError("status", f"expected 403, 4xx, >=400 or 400-499, got {text!r}")


def _status_predicate(value: object) -> Predicate:
    items = [str(value)] if isinstance(value, int) and not isinstance(value, bool) else None
    tests = [_status_test(item) for item in (items or _as_list("status", value))]
    return lambda facts: facts.status is not None and any(test(facts.status) for test in tests)


_PORT_SPAN = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")


def _port_predicate(value: object) -> Predicate:
    """``443``, ``[443, 8443]``, ``"8000-8999"`` (filters: ``port:443,8000-8999``)."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise MatcherError("port", "expected a port, a list of ports or a range")
    spans: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            low = high = item
        elif isinstance(item, str) and (match := _PORT_SPAN.match(item.strip())):
            low = int(match.group(1))
            high = int(match.group(2) or low)
        else:
            raise MatcherError("port", f'expected 443, [443, 8443] or "8000-8999", got {item!r}')
        if not 1 <= low <= high <= 65535:
            raise MatcherError("port", f"port out of range: {item!r}")
        spans.append((low, high))
    return lambda facts: (
        facts.port is not None and any(low <= facts.port <= high for low, high in spans)
    )


def _query_predicate(value: object) -> Predicate:
    if isinstance(value, Mapping):
        checks: list[tuple[str, re.Pattern[str]]] = []
        for name, wanted in value.items():
            checks.append((str(name), compile_name_globs(f"query.{name}", wanted, nocase=False)))

        def match_params(facts: Facts) -> bool:
            params = _parse_query(facts.query)
            return all(
                any(pattern.fullmatch(item) for item in params.get(name, ()))
                for name, pattern in checks
            )

        return match_params
    if value == "":
        return lambda facts: facts.query == ""  # exactly no query string
    pattern = compile_name_globs("query", value, nocase=False)
    return lambda facts: pattern.fullmatch(facts.query) is not None


@functools.lru_cache(maxsize=512)
def _parse_query(query: str) -> dict[str, list[str]]:
    """Parsed once per distinct query string, however many rules look at it (read-only)."""
    params: dict[str, list[str]] = {}
    for name, item in parse_qsl(query, keep_blank_values=True):
        params.setdefault(name, []).append(item)
    return params


def _header_predicate(value: object) -> Predicate:
    if not isinstance(value, Mapping) or not value:
        raise MatcherError("header", 'expected a table such as header.x-api-version = "2*"')
    checks = [
        (str(name).lower(), compile_name_globs(f"header.{name}", wanted, nocase=False))
        for name, wanted in value.items()
    ]

    def match_headers(facts: Facts) -> bool:
        for name, pattern in checks:
            present = facts.headers.get(name)
            if present is None or pattern.fullmatch(present) is None:
                return False
        return True

    return match_headers


def field_predicate(name: str, value: object) -> Predicate:
    """The field table shared by rules and filters."""
    if name == "method":
        methods = frozenset(item.upper() for item in _as_list(name, value))
        return lambda facts: facts.method.upper() in methods
    if name == "target":
        pattern = compile_name_globs(name, value, nocase=False)
        return lambda facts: (
            facts.target is not None and pattern.fullmatch(facts.target) is not None
        )
    if name == "path":
        return _path_predicate(value)
    if name == "host":
        host_matches = compile_host_globs(name, value)
        return lambda facts: host_matches(_strip_port(facts.host))
    if name == "port":
        return _port_predicate(value)
    if name == "subject":
        pattern = compile_name_globs(name, value, nocase=False)
        return lambda facts: (
            facts.subject is not None and pattern.fullmatch(facts.subject) is not None
        )
    if name == "groups":
        wanted = frozenset(_as_list(name, value))
        return lambda facts: not wanted.isdisjoint(facts.groups)
    if name == "content_type":
        pattern = compile_name_globs(name, value, nocase=True)
        return lambda facts: pattern.fullmatch(_media_type(facts.content_type)) is not None
    if name == "decision":
        wanted = frozenset(item.lower() for item in _as_list(name, value))
        return lambda facts: facts.decision is not None and facts.decision.lower() in wanted
    if name == "rule":
        pattern = compile_name_globs(name, value, nocase=False)
        return lambda facts: facts.rule is not None and pattern.fullmatch(facts.rule) is not None
    if name == "status":
        return _status_predicate(value)
    if name == "query":
        return _query_predicate(value)
    if name == "header":
        return _header_predicate(value)
    raise MatcherError(name, f"unknown field {name!r}; known fields: {', '.join(sorted(FIELDS))}")


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def compile_body(value: object) -> re.Pattern[bytes]:
    if not isinstance(value, str) or not value:
        raise MatcherError("body", "expected a regular expression string")
    try:
        return re.compile(value.encode())
    except re.error as exc:
        raise MatcherError("body", f"invalid regular expression: {exc}") from None


#: Cheap set lookups first, regexes later: most rules fail on target or method.
_FIELD_COST = {
    "target": 0,
    "method": 0,
    "groups": 1,
    "subject": 2,
    "host": 3,
    "port": 3,
    "path": 4,
    "content_type": 5,
    "header": 6,
    "query": 7,
}


def compile_matcher(spec: Mapping[str, object], *, for_policy: bool = True) -> Matcher:
    """Compile a rule's matcher fields; ``for_policy`` refuses fields known only afterwards."""
    predicates: list[Predicate] = []
    body: re.Pattern[bytes] | None = None
    secret_wanted: bool | None = None
    for name, value in sorted(spec.items(), key=lambda item: _FIELD_COST.get(item[0], 9)):
        if name == "carries_secret":
            if not isinstance(value, bool):
                raise MatcherError(name, "expected true or false")
            secret_wanted = value
            continue
        if for_policy and name in FLOW_ONLY_FIELDS:
            raise MatcherError(name, "is only known after the response; rules cannot match on it")
        if name == "body":
            body = compile_body(value)
        else:
            predicates.append(field_predicate(name, value))
    return Matcher(
        tuple(predicates),
        body,
        False,
        tuple(spec),
        targets=_exact_names(spec.get("target")),
        methods=_exact_names(spec.get("method"), upper=True),
        secret_wanted=secret_wanted,
        hosts=_exact_names(spec.get("host"), lower=True),
    )


def _exact_names(
    value: object, *, upper: bool = False, lower: bool = False
) -> frozenset[str] | None:
    """The value as a set of plain names, or None when absent or using glob syntax."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or any(
        not isinstance(name, str) or any(char in name for char in "*?[") for name in names
    ):
        return None
    if lower:
        return frozenset(name.lower().removesuffix(".") for name in names)
    return frozenset(name.upper() if upper else name for name in names)


def headers_for_facts(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Lower-case names, repeated headers joined the way HTTP folds them."""
    merged: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        merged[key] = f"{merged[key]}, {value}" if key in merged else value
    return merged
