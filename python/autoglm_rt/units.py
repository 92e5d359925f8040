"""Byte sizes as users write them: ints or strings with binary (Ki, Mi, Gi, Ti) or decimal
(k, M, G, T) suffixes, e.g. ``"12Gi"``, ``"512Mi"``, ``"1.5G"``, ``"4096"``."""

from __future__ import annotations

import re

_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(value: int | float | str, *, name: str = "size") -> int:
    """Returns ``value`` in bytes (a non-negative int). Raises ValueError/TypeError naming ``name``."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected a byte count or a string like '12Gi', got a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{name}: expected a non-negative byte count, got {value}")
        return value
    if isinstance(value, float):
        if not value >= 0 or value != value or value == float("inf"):
            raise ValueError(f"{name}: expected a finite non-negative byte count, got {value}")
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _SUFFIXES:
            raise ValueError(
                f"{name}: cannot parse {value!r}; expected a number with an optional suffix "
                "Ki/Mi/Gi/Ti (binary) or k/M/G/T (decimal), e.g. '12Gi'"
            )
        return int(float(m.group(1)) * _SUFFIXES[unit])
    raise TypeError(f"{name}: expected an int or a string like '12Gi', got {type(value).__name__}")


def format_size(nbytes: int | float) -> str:
    """Human-readable binary size: ``format_size(3 * 2**30) == '3.00 GiB'``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
