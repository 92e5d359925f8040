"""Regime-aware density for top-k gradient compression (Accordion, Agarwal et al., MLSys 2021).

Plain Python over numbers. The DDP hook (:class:`autoglm_rt.ddp.TopKState`) feeds it, once per
iteration, the mean over ranks of each rank's squared gradient norm (every rank computes it from
the same gathered data, so every rank feeds the same numbers, and it does not depend on the density
chosen) and asks it for the next iteration's density.

Every ``interval`` iterations the controller compares the window's mean gradient norm with the
previous window's: a relative change of at least ``threshold`` marks a critical regime (the loss
landscape is moving: start of training, after a learning-rate change, an instability) and the next
window runs at ``ceiling``; otherwise it runs at ``floor``. The first ``critical_windows`` windows
are critical by definition, and :meth:`DensityController.mark_critical` (e.g. when the learning
rate changes or the phase detector says unstable) forces the next window to be.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["DensityController", "DensityControllerConfig"]


@dataclass(frozen=True)
class DensityControllerConfig:
    """floor/ceiling: densities of quiet and critical windows (0 < floor <= ceiling <= 1).
    interval: iterations per window (>= 1). threshold: relative change of the mean gradient norm
    between windows that marks a critical regime (> 0; Accordion's eta = 0.5).
    critical_windows: windows at the start that are critical whatever the norm does (>= 0)."""

    floor: float = 0.005
    ceiling: float = 0.05
    interval: int = 10
    threshold: float = 0.5
    critical_windows: int = 1

    def __post_init__(self) -> None:
        for name in ("floor", "ceiling"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise ValueError(f"{name}: expected a number in (0, 1], got {v!r}")
        if self.floor > self.ceiling:
            raise ValueError(f"floor: expected floor <= ceiling, got floor {self.floor} > ceiling {self.ceiling}")
        for name in ("interval", "critical_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "interval" else 0):
                raise ValueError(f"{name}: expected an int >= {1 if name == 'interval' else 0}, got {v!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise ValueError(f"threshold: expected a finite number > 0, got {t!r}")


class DensityController:
    """Chooses a density per window from the gradient norm's relative change.

    Deterministic: the same sequence of :meth:`observe` calls gives the same densities, so ranks
    fed the same all-reduced figures choose the same density. A non-finite norm is ignored (the
    window's mean is over finite ones; a window with none keeps the previous decision)."""

    def __init__(self, config: DensityControllerConfig | None = None) -> None:
        self.config = config or DensityControllerConfig()
        self._window_sum = 0.0
        self._window_count = 0
        self._window_len = 0
        self._previous_mean: float | None = None
        self._windows = 0
        self._force = False
        self.critical = True
        self.last_change: float | None = None
        self.critical_windows_seen = 0

    @property
    def density(self) -> float:
        """The density of the current window."""
        return self.config.ceiling if self.critical else self.config.floor

    def mark_critical(self) -> None:
        """Makes the next window critical: after a learning-rate change, or when the phase
        detector flags instability. Under :class:`autoglm_rt.ddp.TopKState` each window's
        decision is all-reduced (max) across ranks, so a call on one rank alone is enough and
        never makes ranks disagree."""
        self._force = True

    def observe(self, global_sq_norm: float) -> bool:
        """Records one iteration's squared gradient norm; returns True when a window closed (the
        density may have changed)."""
        if math.isfinite(global_sq_norm) and global_sq_norm >= 0:
            self._window_sum += math.sqrt(global_sq_norm)
            self._window_count += 1
        self._window_len += 1
        if self._window_len < self.config.interval:
            return False
        self._close_window()
        return True

    def _close_window(self) -> None:
        mean = self._window_sum / self._window_count if self._window_count else None
        self._windows += 1
        critical = self.critical
        if mean is not None:
            prev = self._previous_mean
            if prev is not None and prev > 0:
                self.last_change = abs(mean - prev) / prev
                critical = self.last_change >= self.config.threshold
            else:
                critical = False
            self._previous_mean = mean
        if self._windows < self.config.critical_windows or self._force:
            critical = True
        self._force = False
        self.critical = critical
        self.critical_windows_seen += int(critical)
        self._window_sum, self._window_count, self._window_len = 0.0, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "window_sum": self._window_sum,
            "window_count": self._window_count,
            "window_len": self._window_len,
            "previous_mean": self._previous_mean,
            "windows": self._windows,
            "force": self._force,
            "critical": self.critical,
            "last_change": self.last_change,
            "critical_windows_seen": self.critical_windows_seen,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        if set(sd) != expected:
            raise ValueError(f"state dict: expected keys {sorted(expected)}, got {sorted(sd)}")
        self._window_sum = float(sd["window_sum"])
        self._window_count = int(sd["window_count"])
        self._window_len = int(sd["window_len"])
        self._previous_mean = None if sd["previous_mean"] is None else float(sd["previous_mean"])
        self._windows = int(sd["windows"])
        self._force = bool(sd["force"])
        self.critical = bool(sd["critical"])
        self.last_change = None if sd["last_change"] is None else float(sd["last_change"])
        self.critical_windows_seen = int(sd["critical_windows_seen"])
