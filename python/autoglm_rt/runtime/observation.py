"""What one optimizer step saw, as plain numbers: read from the device once per step.

:func:`read_gradients` runs the fused statistics over the gradients (one native call) before the
optimizer step; :func:`read_memory` reads the memory signal's statistics after it and starts the
next step's peak. The :class:`Observation` built from both is all the policy pipeline gets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from autoglm_rt.constants import limit_or_none


@dataclass(frozen=True)
class GradientReading:
    """Global statistics of one step's gradients: squared L2 norm, Welford variance of the
    elements, and the count of NaN/Inf elements."""

    sqnorm: float
    var: float
    nonfinite: int

    @property
    def norm(self) -> float:
        return math.sqrt(self.sqnorm) if math.isfinite(self.sqnorm) else math.inf


@dataclass(frozen=True)
class MemoryReading:
    """The memory signal after a step: its statistics, the step's peak working set and the limit
    (None: none)."""

    stats: Mapping[str, Any] = field(default_factory=dict)
    step_peak_bytes: int | None = None
    limit_bytes: float | None = None


@dataclass(frozen=True)
class Observation:
    """One step, as the policy pipeline sees it. ``now``: the runtime's clock at the start of
    ``step()``; ``step_seconds``: wall time since the previous step ended (None for the first);
    ``compute_seconds``: time spent in forward/backward; ``noise_pair``: ``(local_sqnorm,
    local_batch, global_sqnorm, global_batch)`` for the noise-scale estimator, or None;
    ``monitor``: host/GPU figures from the monitor (``gpu_utilization``, ``cpu_usage`` ...)."""

    step: int
    now: float
    loss: float | None
    samples: int
    gradients: GradientReading
    noise_pair: tuple[float, float, float, float] | None
    step_seconds: float | None
    compute_seconds: float
    memory: MemoryReading
    monitor: Mapping[str, Any] = field(default_factory=dict)


def read_gradients(grads: list[torch.Tensor]) -> GradientReading:
    """One fused pass over ``grads`` (``autoglm_rt.ops.grad_stats``)."""
    from autoglm_rt.ops import grad_stats

    total = grad_stats(grads).total
    return GradientReading(float(total.sumsq), float(total.var), int(total.nonfinite))


def read_memory(signal: Any) -> MemoryReading:
    """Reads ``signal.stats()`` (a pool, or anything with the pool's statistics keys) and resets
    its peak so the next reading is the next step's peak. ``signal=None``: an empty reading."""
    if signal is None:
        return MemoryReading()
    stats: dict[str, Any] = dict(signal.stats())
    peak = int(stats.get("peak_allocated_bytes", stats.get("allocated_bytes", 0)) or 0)
    reset = getattr(signal, "reset_peak_stats", None)
    if callable(reset):
        reset()
    limit = limit_or_none(stats.get("limit_bytes"))
    return MemoryReading(stats, peak, None if limit is None else float(limit))


def noise_pair(
    comm_norms: Mapping[str, float] | None,
    samples: int,
    micro_sqnorms: list[tuple[float, int]],
    global_sqnorm: float,
) -> tuple[float, float, float, float] | None:
    """``(local_sqnorm, local_batch, global_sqnorm, global_batch)``: from the DDP hook's per-rank
    vs averaged squared norms when there are several ranks, else from the micro-batch gradients
    vs their accumulated mean; None when neither exists."""
    if comm_norms and comm_norms.get("world_size", 1) > 1 and samples > 0:
        world = float(comm_norms["world_size"])
        return (
            float(comm_norms["mean_local_sq_norm"]),
            float(samples),
            float(comm_norms["global_sq_norm"]),
            samples * world,
        )
    if len(micro_sqnorms) >= 2 and math.isfinite(global_sqnorm):
        local_batch = sum(b for _, b in micro_sqnorms) / len(micro_sqnorms)
        local_sqnorm = sum(s for s, _ in micro_sqnorms) / len(micro_sqnorms)
        return local_sqnorm, local_batch, global_sqnorm, float(sum(b for _, b in micro_sqnorms))
    return None


__all__ = ["GradientReading", "MemoryReading", "Observation", "noise_pair", "read_gradients", "read_memory"]
