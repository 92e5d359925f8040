"""Goodput sizing of the effective batch (AdaptDL/Pollux) and the LR rule that goes with it: plain
functions over numbers, used by ``policy.batch.BatchController``.

- Statistical efficiency of effective batch B relative to the base batch B0:
  ``E(B) = (b_noise + B0) / (b_noise + B)``.
- Step time: ``step_time = accumulation * t_micro + t_fixed``, read off the measured compute share
  of each step when there is one, else fitted by least squares to measured steps.
- Goodput = throughput x efficiency.
- LR rules for an effective batch B: ``linear`` (B/B0), ``sqrt`` (sqrt(B/B0)) and ``adascale``
  (AdaScale's gain ``r = (B/B0) * E(B)``, between 1 and B/B0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

LR_RULES = ("adascale", "sqrt", "linear", "none")

#: One measured optimizer step: (accumulation, step seconds, compute seconds or None).
StepTiming = tuple[int, float, float | None]


def statistical_efficiency(batch: float, base_batch: float, noise_scale: float) -> float:
    """Pollux's ``E(B) = (b_noise + B0) / (b_noise + B)``: progress per sample at batch B relative
    to B0 (1 at B0, falling as B grows past the noise scale)."""
    return (noise_scale + base_batch) / (noise_scale + batch)


def lr_factor(rule: str, batch: float, base_batch: float, noise_scale: float | None = None) -> float:
    """The factor to multiply the base LR (tuned at ``base_batch``) by at effective batch ``batch``.
    ``adascale`` needs ``noise_scale`` (b_simple); without one it falls back to 1 (no scaling)."""
    if rule not in LR_RULES:
        raise ValueError(f"rule: expected one of {', '.join(LR_RULES)}, got {rule!r}")
    scale = batch / base_batch
    if rule == "linear":
        return scale
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "adascale":
        if noise_scale is None or not math.isfinite(noise_scale) or noise_scale < 0:
            return 1.0
        return scale * statistical_efficiency(batch, base_batch, noise_scale)
    return 1.0


def step_time_model(timings: Iterable[StepTiming]) -> tuple[float, float] | None:
    """``(t_micro, t_fixed)``: the time of one micro-batch and the fixed time per step, or None
    without timings. From the measured compute share when every step has one (medians);
    otherwise fitted by least squares over accumulation counts, and with one count only all time
    is put on the micro-batches (no evidence of a fixed cost)."""
    timings = list(timings)
    if not timings:
        return None
    if all(c is not None for _, _, c in timings):
        micro = sorted(c / a for a, _, c in timings if c is not None)
        fixed = sorted(max(t - c, 0.0) for _, t, c in timings if c is not None)
        return micro[len(micro) // 2], fixed[len(fixed) // 2]
    xs = [a for a, _, _ in timings]
    ys = [t for _, t, _ in timings]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return my / mx, 0.0
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = my - slope * mx
    if slope <= 0:
        return my / mx, 0.0
    return slope, max(intercept, 0.0)


def predicted_goodput(
    batch: int, micro_batch: int, base_batch: int, model: tuple[float, float], noise_scale: float
) -> float:
    """Statistically efficient samples per second at effective batch ``batch`` split into
    micro-batches of ``micro_batch``, with step-time ``model`` ``(t_micro, t_fixed)``."""
    t_micro, t_fixed = model
    accumulation = -(-batch // micro_batch)
    throughput = batch / (accumulation * t_micro + t_fixed)
    return throughput * statistical_efficiency(batch, base_batch, noise_scale)


__all__ = ["LR_RULES", "StepTiming", "lr_factor", "predicted_goodput", "statistical_efficiency", "step_time_model"]
