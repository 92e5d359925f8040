"""The values a strategy file may hold, checked one at a time: comparison thresholds of each metric
kind, durations, and each action's value within what its actuator can carry out.

Every function takes a value already read from YAML and returns it normalised (ratios as 0..1,
durations and ``seconds`` thresholds in seconds, sizes in bytes), or raises :class:`InvalidValue`
with a message that says what was expected; ``policy.strategy_file`` adds the file, line and
field and raises ``ConfigError``.
"""

from __future__ import annotations

import math
import re
from typing import Any

from autoglm_rt.constants import PHASES, PRECISIONS, UNLIMITED_BYTES
from autoglm_rt.policy.strategy_rules import ACTIONS
from autoglm_rt.units import parse_size

#: Largest values actions accept (what the actuators can carry out): GPU memory limits stay below
#: UNLIMITED_BYTES (which means "no limit"), thread counts and replica steps below these.
MAX_CPU_THREADS = 4096
MAX_REPLICA_STEP = 1024

_COND_RE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\S.*?)\s*$")
_DURATION_RE = re.compile(r"^\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class InvalidValue(ValueError):
    """A value its field does not accept; the message says what was expected."""


def phase_comparison(value: Any) -> tuple[str, str]:
    """``(op, phase)`` of a scalar phase condition: ``"fine_tuning"`` (``==``) or
    ``"!=initial"``."""
    if not isinstance(value, str):
        raise InvalidValue(f"expected a phase name, got {value!r}")
    m = _COND_RE.match(value)
    op, name = (m.group(1), m.group(2)) if m else ("==", value.strip())
    if op not in ("==", "!=") or name not in PHASES:
        raise InvalidValue(f"expected a phase ({', '.join(PHASES)}), '!=phase' or a list, got {value!r}")
    return op, name


def phase_names(names: list[Any]) -> tuple[str, ...]:
    """The phases of a list condition (``phase: [initial, convergence]``), each a known phase."""
    if not names:
        raise InvalidValue("expected a non-empty list of phases")
    for n in names:
        if n not in PHASES:
            raise InvalidValue(f"unknown phase {n!r}; expected one of {', '.join(PHASES)}")
    return tuple(names)


def comparison(kind: str, value: Any, fld: str) -> tuple[str, Any]:
    """``(op, threshold)`` of a condition on a metric of ``kind`` (not ``phase``): ``true``/``false``
    for ``bool``, else a string such as ``'>80%'`` whose threshold :func:`threshold` reads."""
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidValue(f"expected true or false, got {value!r}")
        return "==", value
    if not isinstance(value, str):
        raise InvalidValue(f"expected a comparison string such as {example(kind)}, got {value!r}")
    m = _COND_RE.match(value)
    if not m:
        raise InvalidValue(f"expected a comparison such as {example(kind)}, got {value!r}")
    return m.group(1), threshold(kind, m.group(2), fld)


def threshold(kind: str, text: str, fld: str) -> float:
    """The threshold ``text`` of a metric of ``kind``: ``ratio`` (``80%`` or ``0.8``, within 0..1),
    ``seconds`` (a duration), ``bytes`` (a size), ``count`` (>= 0) or ``number`` (finite)."""
    bad = f"bad threshold {text!r}; expected {example(kind)}"
    if kind == "ratio":
        pct = text.endswith("%")
        number = finite_float(text[:-1] if pct else text)
        if number is None:
            raise InvalidValue(bad)
        ratio = number / 100 if pct else number
        if not 0.0 <= ratio <= 1.0:
            raise InvalidValue(f"ratio {text!r} outside 0..1 (0%..100%)")
        return ratio
    if kind == "seconds":
        seconds = duration_text(text)
        if seconds is None:
            raise InvalidValue(bad)
        return seconds
    if kind == "bytes":
        try:
            return float(parse_size(text, name=fld))
        except (TypeError, ValueError):
            raise InvalidValue(bad) from None
    number = finite_float(text)
    if number is None or (kind == "count" and number < 0):
        raise InvalidValue(bad)
    return number


def duration(value: Any) -> float:
    """Seconds of a ``for``/``cooldown`` value: a number of seconds >= 0 or a string such as
    ``30s``, ``250ms``, ``5m``, ``1h``."""
    seconds: float | None
    if isinstance(value, bool):
        seconds = None
    elif isinstance(value, (int, float)):
        seconds = float(value) if math.isfinite(value) and value >= 0 else None
    elif isinstance(value, str):
        seconds = duration_text(value)
    else:
        seconds = None
    if seconds is None:
        raise InvalidValue(f"expected a duration such as 30s, 250ms, 5m or a number of seconds, got {value!r}")
    return seconds


def action_value(name: str, value: Any, fld: str) -> Any:
    """The value of action ``name`` (a key of ``ACTIONS``) as its actuator takes it: an int in
    1..MAX_CPU_THREADS or 1..MAX_REPLICA_STEP, a bool, a size in bytes below UNLIMITED_BYTES or
    ``("ratio", r)`` for a percentage, a precision name, or a non-empty message."""
    kind = ACTIONS[name][0]
    if kind == "positive_int":
        top = MAX_CPU_THREADS if name == "adjust_cpu_threads" else MAX_REPLICA_STEP
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise InvalidValue(f"expected a positive integer (1..{top}), got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise InvalidValue(f"expected true or false, got {value!r}")
        return value
    if kind == "size_or_ratio":
        return _size_or_ratio(value, fld)
    if kind == "precision":
        if value not in PRECISIONS:
            raise InvalidValue(f"expected one of {', '.join(PRECISIONS)}, got {value!r}")
        return value
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"expected a non-empty message, got {value!r}")
    return value


def _size_or_ratio(value: Any, fld: str) -> Any:
    if isinstance(value, str) and value.strip().endswith("%"):
        number = finite_float(value.strip()[:-1])
        if number is None or not 0 < number <= 100:
            raise InvalidValue(f"expected a percentage in (0%, 100%], got {value!r}")
        return ("ratio", number / 100)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidValue(f"expected a size such as '12Gi' or a percentage such as '60%', got {value!r}")
    try:
        size = parse_size(value, name=fld)
    except (TypeError, ValueError) as exc:
        raise InvalidValue(str(exc)) from None
    if not 0 < size < UNLIMITED_BYTES:
        raise InvalidValue(f"expected a positive size below {UNLIMITED_BYTES} bytes (4194304Ti), got {value!r}")
    return size


def example(kind: str) -> str:
    """A valid comparison for a metric of ``kind``, for error messages."""
    return {
        "ratio": "'>80%' or '>= 0.8'",
        "seconds": "'>250ms' or '<2s'",
        "bytes": "'>10Gi'",
        "count": "'>0'",
        "number": "'>4' or '<= 1.5'",
    }.get(kind, "'>1'")


def finite_float(text: str) -> float | None:
    """``float(text)`` when it is finite, else None."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def duration_text(text: str) -> float | None:
    """Seconds of ``30s``, ``250ms``, ``5m``, ``1h`` or a bare number; None when malformed."""
    m = _DURATION_RE.match(text)
    if not m:
        return None
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return seconds if math.isfinite(seconds) else None


__all__ = [
    "MAX_CPU_THREADS",
    "MAX_REPLICA_STEP",
    "InvalidValue",
    "action_value",
    "comparison",
    "duration",
    "duration_text",
    "example",
    "finite_float",
    "phase_comparison",
    "phase_names",
    "threshold",
]
