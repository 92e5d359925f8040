"""Read-only views of a Runtime's parts: what users read between steps. Mixed into
:class:`~autoglm_rt.runtime.facade.Runtime`, whose constructor sets the attributes they read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.memory import MemoryPolicy
from autoglm_rt.policy.phase import PhaseDetector
from autoglm_rt.policy.strategy import Strategy

if TYPE_CHECKING:
    from autoglm_rt.runtime.cpu_quota import QuotaThreads
    from autoglm_rt.runtime.metrics import RuntimeMetrics
    from autoglm_rt.runtime.pipeline import PolicyPipeline
    from autoglm_rt.runtime.precision import Precision


class RuntimeViews:
    """The parts' current state, by name (no copies: the live objects)."""

    pipeline: PolicyPipeline
    precision_policy: Precision
    cpu_quota: QuotaThreads | None
    metrics: RuntimeMetrics

    @property
    def controller(self) -> BatchController:
        if self.pipeline.batch is None:
            raise RuntimeError("the effective batch is not known yet: pass effective_batch= or call batches() first")
        return self.pipeline.batch

    @property
    def batch_controller(self) -> BatchController | None:
        return self.pipeline.batch

    @property
    def phase_detector(self) -> PhaseDetector:
        return self.pipeline.phase

    @property
    def memory_policy(self) -> MemoryPolicy | None:
        return self.pipeline.memory

    @property
    def strategy(self) -> Strategy | None:
        return self.pipeline.strategy

    @property
    def precision(self) -> str:
        """The autocast precision of the next forward passes (``float32``: none)."""
        return self.precision_policy.current

    @property
    def threads(self) -> int | None:
        """The compute thread count the Runtime set: the step-time loop's choice within the CPU
        quota's ``cores_cap``, or that cap alone; None when it set none."""
        quota = self.cpu_quota
        if quota is not None and (self.pipeline.threads is not None or quota.cap is not None):
            return quota.applied
        return None if self.pipeline.threads is None else self.pipeline.threads.threads

    @property
    def skipped_steps(self) -> int:
        return self.metrics.skipped_steps

    @property
    def ooms_recovered(self) -> int:
        return self.metrics.ooms_recovered


__all__ = ["RuntimeViews"]
