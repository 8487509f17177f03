"""Map a TOML key path to the line that wrote it, so config errors can name file and line.

tomllib reports positions only for syntax errors; validation errors arrive as key paths
like ``("rules", 2, "path")``. A light line scan is enough to point a person at the right
line: it understands table headers, arrays of tables, dotted keys and multi-line strings.
"""

from __future__ import annotations

import re

_ARRAY_TABLE = re.compile(r"^\s*\[\[\s*([^\]]+?)\s*\]\]")
_TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_PART = re.compile(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""")

Loc = tuple[str | int, ...]


def _split_key(text: str) -> list[str]:
    return [part.strip("\"'") for part in _PART.findall(text)]


_TRIPLES = ('""' + '"', "''" + "'")


def _opens_multiline(value: str) -> str | None:
    """The delimiter of a multi-line string left open at the end of this value, if any.

    Walks the value quote by quote so a triple quote inside a one-line string or a
    comment does not count.
    """
    index = 0
    while index < len(value):
        char = value[index]
        if char == "#":
            return None
        triple = next((t for t in _TRIPLES if value.startswith(t, index)), None)
        if triple is not None:
            end = value.find(triple, index + 3)
            if end < 0:
                return triple
            index = end + 3
        elif char in "\"'":
            end = index + 1
            while end < len(value) and value[end] != char:
                end += 2 if char == '"' and value[end] == "\\" else 1
            index = end + 1
        else:
            index += 1
    return None


class KeyLines:
    """Line numbers (1-based) of every table header and key in one TOML document."""

    def __init__(self, source: str) -> None:
        self._lines: dict[Loc, int] = {}
        self._build(source)

    def _build(self, source: str) -> None:
        counts: dict[tuple[str, ...], int] = {}
        current: Loc = ()
        in_multiline: str | None = None
        for number, line in enumerate(source.splitlines(), start=1):
            if in_multiline:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            if match := _ARRAY_TABLE.match(line):
                name = tuple(_split_key(match.group(1)))
                index = counts.get(name, -1) + 1
                counts[name] = index
                current = (*name, index)
                self._lines.setdefault(current, number)
                continue
            if match := _TABLE.match(line):
                current = self._resolve_table(tuple(_split_key(match.group(1))), counts)
                self._lines.setdefault(current, number)
                continue
            if match := _KEY.match(line):
                self._lines.setdefault((*current, *_split_key(match.group(1))), number)
                in_multiline = _opens_multiline(line[match.end() :])

    @staticmethod
    def _resolve_table(name: tuple[str, ...], counts: dict[tuple[str, ...], int]) -> Loc:
        """``[targets.x]`` after ``[[targets]]`` belongs to the latest array element."""
        for cut in range(len(name) - 1, 0, -1):
            prefix = name[:cut]
            if prefix in counts:
                return (*prefix, counts[prefix], *name[cut:])
        return name

    def line_of(self, loc: Loc) -> int | None:
        """The line of the longest prefix of ``loc`` that the document wrote."""
        for cut in range(len(loc), 0, -1):
            key = tuple(str(part) if not isinstance(part, int) else part for part in loc[:cut])
            if key in self._lines:
                return self._lines[key]
        return None
