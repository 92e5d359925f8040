"""Smoothing of irregularly sampled series: a time-aware EWMA and a time-based sliding window.

Both take explicit timestamps (seconds, any monotonic clock), so they are exact under jittered
sampling periods and can be tested without sleeping.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


def _check_time(t: float, last: float | None, name: str) -> None:
    if not math.isfinite(t):
        raise ValueError(f"{name}: expected a finite timestamp, got {t}")
    if last is not None and t < last:
        raise ValueError(f"{name}: timestamps must not go backwards ({t} < {last})")


class Ewma:
    """Exponentially weighted moving average with a half-life in seconds.

    After a gap of ``dt`` seconds the previous value keeps weight ``0.5 ** (dt / halflife)``, so a
    step input reaches half way after one half-life whatever the sampling period. The first finite
    value initialises the average. Non-finite values (NaN, Inf) are skipped and counted in
    ``skipped``: one bad reading never poisons the average.
    """

    def __init__(self, halflife: float) -> None:
        if isinstance(halflife, bool) or not isinstance(halflife, (int, float)):
            raise TypeError(f"halflife: expected seconds as a number, got {type(halflife).__name__}")
        if not (math.isfinite(halflife) and halflife > 0):
            raise ValueError(f"halflife: expected a finite number of seconds > 0, got {halflife}")
        self.halflife = float(halflife)
        self.value: float | None = None
        self.last_time: float | None = None
        self.skipped = 0

    def update(self, value: float, t: float) -> float | None:
        """Folds ``value`` observed at time ``t`` in and returns the average (None until a finite
        value has been seen). Raises ValueError if ``t`` goes backwards."""
        _check_time(t, self.last_time, "t")
        value = float(value)
        if not math.isfinite(value):
            self.skipped += 1
            return self.value
        if self.value is None or self.last_time is None:
            self.value = value
        else:
            keep = 0.5 ** ((t - self.last_time) / self.halflife)
            self.value = keep * self.value + (1.0 - keep) * value
        self.last_time = t
        return self.value


@dataclass(frozen=True)
class WindowStats:
    """Summary of the finite values inside a sliding window."""

    count: int
    mean: float
    minimum: float
    maximum: float
    last: float


class SlidingWindow:
    """The values observed during the last ``length`` seconds (inclusive of the window's start).

    Non-finite values are skipped (counted in ``skipped``). Memory is bounded by the number of
    samples inside the window.
    """

    def __init__(self, length: float) -> None:
        if isinstance(length, bool) or not isinstance(length, (int, float)):
            raise TypeError(f"length: expected seconds as a number, got {type(length).__name__}")
        if not (math.isfinite(length) and length > 0):
            raise ValueError(f"length: expected a finite number of seconds > 0, got {length}")
        self.length = float(length)
        self._items: deque[tuple[float, float]] = deque()
        self._last_time: float | None = None
        self.skipped = 0

    def add(self, value: float, t: float) -> None:
        """Adds ``value`` observed at ``t`` and drops values older than ``t - length``."""
        _check_time(t, self._last_time, "t")
        self._last_time = t
        value = float(value)
        if math.isfinite(value):
            self._items.append((t, value))
        else:
            self.skipped += 1
        cutoff = t - self.length
        while self._items and self._items[0][0] < cutoff:
            self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)

    def values(self) -> list[float]:
        """The values currently inside the window, oldest first."""
        return [v for _, v in self._items]

    def stats(self) -> WindowStats | None:
        """Count, mean, min, max and last of the window; None when it holds no value."""
        if not self._items:
            return None
        vals = self.values()
        return WindowStats(len(vals), math.fsum(vals) / len(vals), min(vals), max(vals), vals[-1])
