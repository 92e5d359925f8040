"""Memory tiers for optimizer state: a fused CPU Adam/AdamW step, offload of the moments to
pinned host memory or a memory-mapped file, and the escalation policy that decides when."""

from autoglm_rt.offload.escalation import Decision, EscalationConfig, MemoryEscalation, MemoryStep
from autoglm_rt.offload.fused_adam import fused_adam_step
from autoglm_rt.offload.optimizer_offload import TIERS, OptimizerOffload

__all__ = [
    "TIERS",
    "Decision",
    "EscalationConfig",
    "MemoryEscalation",
    "MemoryStep",
    "OptimizerOffload",
    "fused_adam_step",
]
