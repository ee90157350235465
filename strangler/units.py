"""Durations (`250ms`, `10s`, `5m`) and sizes (`64KiB`, `10MiB`) as written."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_DIVISORS = {"ms": 1000.0, "s": 1.0}
_DURATION_FACTORS = {"m": 60.0, "h": 3600.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_FACTORS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}


def parse_duration(text: str | int | float) -> float:
    """Seconds from `250ms`, `10s`, `5m`, `1h`; a bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"expected a duration like 250ms or 10s, got {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration cannot be negative, got {text!r}")
        return float(text)
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"expected a duration like 250ms, 10s or 5m, got {text!r}")
    number, unit = float(found.group(1)), found.group(2)
    if unit in _DURATION_DIVISORS:
        return number / _DURATION_DIVISORS[unit]
    return number * _DURATION_FACTORS[unit]


def parse_size(text: str | int) -> int:
    """Bytes from `64KiB`, `10MiB`, `1GiB`; a bare number is bytes."""
    if isinstance(text, bool):
        raise ValueError(f"expected a size like 64KiB or 10MiB, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text!r}")
        return text
    found = _SIZE.match(str(text))
    if found is None:
        raise ValueError(f"expected a size like 64KiB or 10MiB, got {text!r}")
    return int(found.group(1)) * _SIZE_FACTORS[found.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest readable spelling, for `explain` and `status` output."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60 or seconds % 60:
        return f"{seconds:g}s"
    return f"{seconds / 60:g}m"
