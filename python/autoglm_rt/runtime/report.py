"""What one ``Runtime.step()`` saw and did."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoglm_rt.policy.actuators import ActionResult
from autoglm_rt.policy.phase import PhaseEvent


@dataclass(frozen=True)
class StepReport:
    """``step_seconds``: wall time from the end of the previous ``step()`` to the start of this
    one (None for the first). ``overhead_seconds``: the time ``step()`` itself took, without the
    optimizer's own step. ``actions``: every strategy action of this step, carried out or not
    (``applied`` and ``detail`` say which and why), and the memory escalation's offload or
    restore. ``optimizer_offloaded``: whether the optimizer state is on the slower tier after this
    step (None without ``MemoryConfig(offload=...)``)."""

    step: int
    loss: float | None
    step_seconds: float | None
    overhead_seconds: float
    grad_norm: float
    nonfinite: int
    skipped: bool
    noise_scale: float | None
    phase: str
    unstable: bool
    micro_batch: int
    accumulation: int
    effective_batch: int
    precision: str
    events: tuple[PhaseEvent, ...] = ()
    actions: tuple[ActionResult, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    optimizer_offloaded: bool | None = None


__all__ = ["StepReport"]
