"""Replays a recorded metric series through a strategy: which actions it would have taken, when.

The series is a CSV with a ``time`` column (seconds, non-decreasing) and one column per metric,
named as in :data:`~autoglm_rt.policy.strategy.METRICS` (``gpu_utilization``, ``pool.reserved_bytes``
...). Ratio metrics accept ``0.85`` or ``85%``; ``phase`` takes a phase name; ``unstable`` takes
true/false/1/0; an empty cell means the metric was not observed in that row.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_rt.constants import PHASES
from autoglm_rt.policy.strategy import Strategy
from autoglm_rt.policy.strategy_rules import METRICS, Action


class MetricsFileError(ValueError):
    """A malformed metric series; the message names the file, row and column."""


@dataclass(frozen=True)
class Observation:
    time: float
    metrics: dict[str, Any]


def read_metrics_csv(path: str | os.PathLike[str]) -> list[Observation]:
    """Parses a metric series (see the module docstring); raises MetricsFileError naming the file,
    line and column of the first problem."""
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        if "time" not in columns:
            raise MetricsFileError(f"{path}:1: expected a 'time' column, got {columns}")
        unknown = [c for c in columns if c != "time" and c not in METRICS]
        if unknown:
            raise MetricsFileError(
                f"{path}:1: unknown metric column {unknown[0]!r}; expected time and metrics among "
                f"{', '.join(sorted(METRICS))}"
            )
        out: list[Observation] = []
        last = -math.inf
        for row in reader:
            line = reader.line_num
            t = _number(row["time"], path, line, "time")
            if t is None or t < last:
                raise MetricsFileError(f"{path}:{line}: time: expected a non-decreasing number, got {row['time']!r}")
            last = t
            metrics: dict[str, Any] = {}
            for col in columns:
                if col == "time" or row.get(col) in (None, ""):
                    continue
                metrics[col] = _value(col, row[col], path, line)
            out.append(Observation(t, metrics))
    return out


def simulate(strategy: Strategy, series: list[Observation]) -> list[Action]:
    """Evaluates ``strategy`` (from a fresh state) on every observation in order; returns the
    actions in the order they were taken."""
    strategy.reset()
    actions: list[Action] = []
    for obs in series:
        actions.extend(strategy.evaluate(obs.metrics, obs.time))
    return actions


def _number(text: str, path: Path, line: int, col: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        raise MetricsFileError(f"{path}:{line}: {col}: expected a number, got {text!r}") from None
    return value if math.isfinite(value) else None


def _value(col: str, text: str, path: Path, line: int) -> Any:
    kind = METRICS[col]
    text = text.strip()
    if kind == "phase":
        if text not in PHASES:
            raise MetricsFileError(f"{path}:{line}: {col}: expected one of {', '.join(PHASES)}, got {text!r}")
        return text
    if kind == "bool":
        low = text.lower()
        if low not in ("true", "false", "1", "0"):
            raise MetricsFileError(f"{path}:{line}: {col}: expected true/false/1/0, got {text!r}")
        return low in ("true", "1")
    if kind == "ratio" and text.endswith("%"):
        number = _number(text[:-1], path, line, col)
        return math.nan if number is None else number / 100
    if text.lower() == "nan":
        return math.nan
    number = _number(text, path, line, col)
    if number is None:
        raise MetricsFileError(f"{path}:{line}: {col}: expected a finite number, got {text!r}")
    return number
