"""The console's filter language: the policy rules' matcher fields, typed in one line.

``method:POST path:/api/** !decision:allowed status:>=400`` compiles to the same ``Matcher``
a rule compiles to, so a filter and a rule that say the same thing match the same flows.
"""

from __future__ import annotations

import re

from proxy.matcher import (
    Matcher,
    MatcherError,
    Predicate,
    compile_body,
    field_predicate,
)


def parse_filter(text: str) -> Matcher:
    """Parse console filter text: ``method:POST path:/api/** !decision:allowed status:>=400``.

    Values separated by commas are alternatives; a leading ``!`` negates a term; a bare word
    matches paths containing it. Errors carry the offending term's position for inline display.
    """
    tokens = _tokenize(text)
    predicates: list[Predicate] = []
    body: re.Pattern[bytes] | None = None
    negated_body = False
    names: list[str] = []
    for position, token in tokens:
        negate = token.startswith("!")
        term = token[1:] if negate else token
        name, sep, raw = _split_term(term)
        if not sep:
            predicates.append(_substring(term, negate))
            names.append("path")
            continue
        raw_values: object = raw.split(",") if name not in ("body", "query", "header") else raw
        try:
            if name == "body":
                body, negated_body = compile_body(raw_values), negate
                names.append(name)
                continue
            if name.startswith("header."):
                predicate = field_predicate("header", {name[7:]: raw_values})
            elif name.startswith("query."):
                predicate = field_predicate("query", {name[6:]: raw_values})
            else:
                predicate = field_predicate(name, raw_values)
        except MatcherError as exc:
            raise MatcherError(exc.field, exc.message, position) from None
        predicates.append(_negate(predicate) if negate else predicate)
        names.append(name)
    return Matcher(tuple(predicates), body, negated_body, tuple(names))


_TOKEN = re.compile(r"""(?:[^\s"']+|"[^"]*"|'[^']*')+""")


def _tokenize(text: str) -> list[tuple[int, str]]:
    """Whitespace-separated terms with their start offsets; quotes group and are removed."""
    tokens: list[tuple[int, str]] = []
    end = 0
    for match in _TOKEN.finditer(text):
        gap = text[end : match.start()]
        if gap.strip():
            raise MatcherError("", "unbalanced quotes", end + len(gap) - len(gap.lstrip()))
        tokens.append((match.start(), re.sub(r"""(["'])(.*?)\1""", r"\2", match.group())))
        end = match.end()
    rest = text[end:]
    if rest.strip():
        raise MatcherError("", "unbalanced quotes", end + len(rest) - len(rest.lstrip()))
    return tokens


def _substring(word: str, negate: bool) -> Predicate:
    """A bare word in the filter bar: paths containing it (the quick search people expect)."""
    if negate:
        return lambda facts: word not in facts.path
    return lambda facts: word in facts.path


def _split_term(term: str) -> tuple[str, str, str]:
    for index, char in enumerate(term):
        if char in ":=":
            return term[:index].lower(), char, term[index + 1 :]
        if not (char.isalnum() or char in "._-"):
            break
    return term, "", ""


def _negate(predicate: Predicate) -> Predicate:
    return lambda facts: not predicate(facts)
