"""The memory escalation order, as plain Python over numbers.

Under pressure (usage / limit at or above ``high_ratio``) the job first shrinks its micro-batch
(the batch controller raises accumulation so the effective batch is kept), then, at the smallest
micro-batch, offloads the optimizer state, and only then fails. When pressure ends (usage at or
below ``low_ratio`` for ``calm_steps`` consecutive observations, and room for the state to come
back below ``low_ratio``) the state is restored. Growing the micro-batch again is the batch
controller's job, not this class's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class MemoryStep(enum.Enum):
    """What the caller should do after one observation."""

    NONE = "none"
    SHRINK_MICRO_BATCH = "shrink_micro_batch"
    OFFLOAD = "offload_optimizer_state"
    RESTORE = "restore_optimizer_state"
    FAIL = "fail"


@dataclass(frozen=True)
class EscalationConfig:
    """Thresholds: ``low_ratio < high_ratio`` in (0, 1]; ``calm_steps`` >= 1."""

    high_ratio: float = 0.90
    low_ratio: float = 0.70
    calm_steps: int = 20
    min_micro_batch: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.low_ratio < self.high_ratio <= 1.0:
            raise ValueError(
                "expected 0 < low_ratio < high_ratio <= 1, "
                f"got low_ratio={self.low_ratio}, high_ratio={self.high_ratio}"
            )
        if self.calm_steps < 1:
            raise ValueError(f"calm_steps: expected >= 1, got {self.calm_steps}")
        if self.min_micro_batch < 1:
            raise ValueError(f"min_micro_batch: expected >= 1, got {self.min_micro_batch}")


@dataclass(frozen=True)
class Decision:
    step: MemoryStep
    reason: str


class MemoryEscalation:
    """Decides one :class:`MemoryStep` per observation; the caller carries it out.

    ``can_offload``: whether an :class:`~autoglm_rt.offload.OptimizerOffload` is attached (without
    one, pressure at the smallest micro-batch goes straight to FAIL).
    """

    def __init__(self, config: EscalationConfig | None = None, *, can_offload: bool = True) -> None:
        self.config = config if config is not None else EscalationConfig()
        self.can_offload = can_offload
        self._calm = 0

    def decide(
        self,
        *,
        usage_bytes: int,
        limit_bytes: int | None,
        micro_batch: int,
        offloaded: bool,
        state_bytes: int = 0,
        oom: bool = False,
    ) -> Decision:
        """One observation: current usage and limit (None: unlimited), the current micro-batch,
        whether the optimizer state is offloaded and its size, and whether an OOM just happened
        (counts as pressure whatever the ratio)."""
        for name, value in (("usage_bytes", usage_bytes), ("state_bytes", state_bytes)):
            if value < 0:
                raise ValueError(f"{name}: expected >= 0, got {value}")
        if limit_bytes is not None and limit_bytes <= 0:
            raise ValueError(f"limit_bytes: expected a positive limit or None, got {limit_bytes}")
        if micro_batch < 1:
            raise ValueError(f"micro_batch: expected >= 1, got {micro_batch}")
        cfg = self.config
        ratio = 0.0 if limit_bytes is None else usage_bytes / limit_bytes
        if oom or ratio >= cfg.high_ratio:
            self._calm = 0
            why = "out of memory" if oom else f"usage {ratio:.2f} of the limit >= {cfg.high_ratio}"
            if micro_batch > cfg.min_micro_batch:
                return Decision(MemoryStep.SHRINK_MICRO_BATCH, why)
            if self.can_offload and not offloaded:
                return Decision(MemoryStep.OFFLOAD, f"{why} at the smallest micro-batch")
            return Decision(
                MemoryStep.FAIL,
                f"{why} at the smallest micro-batch with the optimizer state offloaded"
                if offloaded
                else f"{why} at the smallest micro-batch and nothing to offload",
            )
        if ratio > cfg.low_ratio:
            self._calm = 0
            return Decision(MemoryStep.NONE, f"usage {ratio:.2f} between the thresholds")
        self._calm += 1
        if not offloaded:
            return Decision(MemoryStep.NONE, "no pressure")
        if self._calm < cfg.calm_steps:
            return Decision(MemoryStep.NONE, f"calm for {self._calm} of {cfg.calm_steps} observations")
        after = 0.0 if limit_bytes is None else (usage_bytes + state_bytes) / limit_bytes
        if after > cfg.low_ratio:
            return Decision(MemoryStep.NONE, f"restoring would bring usage to {after:.2f} > {cfg.low_ratio}")
        self._calm = 0
        return Decision(MemoryStep.RESTORE, f"calm for {cfg.calm_steps} observations; usage after restore {after:.2f}")

    def note_pressure(self) -> None:
        """Pressure seen outside :meth:`decide` (a strategy asking for offload): the count of calm
        observations towards a restore starts again."""
        self._calm = 0

    def state_dict(self) -> dict[str, Any]:
        return {"calm": self._calm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        calm = int(state["calm"])
        if calm < 0:
            raise ValueError(f"calm: expected >= 0, got {calm}")
        self._calm = calm
