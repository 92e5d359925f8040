"""Load level (low / medium / high) of a host from CPU utilization and load average per core,
with hysteresis so a value hovering at a threshold does not make the level flap.

The table (utilization as a 0..1 ratio; load = 1-minute load average / logical cores):

=========  ====================  ===================
level      CPU utilization       load per core
=========  ====================  ===================
low        < 0.60                < 0.7
medium     0.60 .. 0.85          0.7 .. 1.2
high       > 0.85                > 1.2
=========  ====================  ===================

Each dimension gets its own level and the host's level is the higher of the two (low needs both
dimensions low; either one high makes it high).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class LoadLevel(enum.IntEnum):
    """Ordered load levels; the int value is what the ``autoglm_rt_load_level`` gauge exports."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2


@dataclass(frozen=True)
class LoadThresholds:
    """Boundaries of the table and the hysteresis margins.

    A dimension moves up as soon as its value crosses the next boundary, and moves down only once
    the value has gone past the boundary by the margin (HIGH is left at ``<= high - margin``,
    MEDIUM at ``< medium - margin``).
    """

    cpu_medium: float = 0.60
    cpu_high: float = 0.85
    load_medium: float = 0.7
    load_high: float = 1.2
    cpu_margin: float = 0.05
    load_margin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("cpu_medium", "cpu_high", "load_medium", "load_high", "cpu_margin", "load_margin"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if not self.cpu_medium < self.cpu_high:
            raise ValueError(f"cpu_medium ({self.cpu_medium}) must be below cpu_high ({self.cpu_high})")
        if not self.load_medium < self.load_high:
            raise ValueError(f"load_medium ({self.load_medium}) must be below load_high ({self.load_high})")


def _raw_level(value: float, medium: float, high: float) -> LoadLevel:
    if value > high:
        return LoadLevel.HIGH
    if value >= medium:
        return LoadLevel.MEDIUM
    return LoadLevel.LOW


def _step(current: LoadLevel, value: float, medium: float, high: float, margin: float) -> LoadLevel:
    """One dimension with hysteresis: up at the boundary; HIGH is left only at
    ``value <= high - margin`` and MEDIUM only at ``value < medium - margin``."""
    up = _raw_level(value, medium, high)
    if up >= current:
        return up
    if current == LoadLevel.HIGH and value > high - margin:
        return LoadLevel.HIGH
    if current >= LoadLevel.MEDIUM and value >= medium - margin:
        return LoadLevel.MEDIUM
    return LoadLevel.LOW


def classify(cpu_ratio: float, load_per_core: float, thresholds: LoadThresholds | None = None) -> LoadLevel:
    """The table's level without hysteresis (the higher of the two dimensions)."""
    th = thresholds or LoadThresholds()
    return max(
        _raw_level(cpu_ratio, th.cpu_medium, th.cpu_high), _raw_level(load_per_core, th.load_medium, th.load_high)
    )


class LoadClassifier:
    """Stateful level with hysteresis and a dwell: a new level is taken only after ``dwell``
    consecutive updates proposed it (``dwell=1``: at once). Feed it smoothed values (EWMA).

    The first finite observation sets the level straight from the table (there is nothing to
    hold against yet); before it the level is LOW. Non-finite inputs leave the level unchanged.
    """

    def __init__(self, thresholds: LoadThresholds | None = None, *, dwell: int = 2) -> None:
        if isinstance(dwell, bool) or not isinstance(dwell, int) or dwell < 1:
            raise ValueError(f"dwell: expected an int >= 1 (consecutive updates), got {dwell!r}")
        self.thresholds = thresholds or LoadThresholds()
        self.dwell = dwell
        self.level = LoadLevel.LOW
        self._cpu_level = LoadLevel.LOW
        self._load_level = LoadLevel.LOW
        self._pending: LoadLevel | None = None
        self._pending_count = 0
        self.transitions = 0
        self._seen = False

    def update(self, cpu_ratio: float, load_per_core: float) -> LoadLevel:
        """Folds one observation in and returns the (possibly unchanged) level."""
        if not (math.isfinite(cpu_ratio) and math.isfinite(load_per_core)):
            return self.level
        th = self.thresholds
        if not self._seen:
            self._seen = True
            self._cpu_level = _raw_level(cpu_ratio, th.cpu_medium, th.cpu_high)
            self._load_level = _raw_level(load_per_core, th.load_medium, th.load_high)
            self.level = max(self._cpu_level, self._load_level)
            return self.level
        cpu = _step(self._cpu_level, cpu_ratio, th.cpu_medium, th.cpu_high, th.cpu_margin)
        load = _step(self._load_level, load_per_core, th.load_medium, th.load_high, th.load_margin)
        proposed = max(cpu, load)
        if proposed == self.level:
            self._pending, self._pending_count = None, 0
            self._cpu_level, self._load_level = cpu, load
            return self.level
        if proposed == self._pending:
            self._pending_count += 1
        else:
            self._pending, self._pending_count = proposed, 1
        if self._pending_count >= self.dwell:
            self.level = proposed
            self._cpu_level, self._load_level = cpu, load
            self._pending, self._pending_count = None, 0
            self.transitions += 1
        return self.level
