"""Human-written durations ("90s", "5m") and sizes ("64MiB") used throughout the config."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 1000,
    "KiB": 1024,
    "MB": 1000**2,
    "MiB": 1024**2,
    "GB": 1000**3,
    "GiB": 1024**3,
}


def parse_duration(value: object) -> float:
    """Seconds from "90s"/"5m"/"250ms"; bare numbers are refused so units are never guessed."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f'expected a duration string such as "90s" or "5m", got {value!r}')
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f'invalid duration {value!r}: write it like "500ms", "90s", "5m", "1h"')
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: object) -> int:
    """Bytes from an integer or "64MiB"-style string."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f'expected a size such as 65536 or "64MiB", got {value!r}')
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f'invalid size {value!r}: write it like 65536, "64KiB", "10MiB"')
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration, for messages and written rules."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    for unit, factor in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= factor and seconds % factor == 0:
            return f"{int(seconds // factor)}{unit}"
    return f"{seconds:g}s"
