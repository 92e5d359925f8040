"""Co-located tenants as the planners see them: the machine share and knobs
(:class:`PlannerConfig`), one tenant's state (:class:`TenantState`), the plan a planner returns
(:class:`ResourcePlan`), the phase shares and the tenants' priority score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from autoglm_rt.policy.scheduler.score import mission_score

__all__ = ["PHASE_SHARES", "PlannerConfig", "ResourcePlan", "TenantState", "base_score", "tenant_score"]

#: Share of a job's requested memory its limit follows in each phase (the mission's rule).
PHASE_SHARES: dict[str, float] = {"initial": 0.9, "convergence": 0.6, "fine_tuning": 0.3}


@dataclass(frozen=True)
class PlannerConfig:
    """The machine given to tenants and the dynamic policy's knobs.

    ``memory`` (bytes) and ``cores``: what all tenants share. ``headroom``: a job's limit never goes
    below ``floor * (1 + headroom)``. A job whose peak exceeds ``grow_when`` of its limit is given
    ``peak * grow_by`` when memory is free. A busy service gets ``service_cores_busy`` cores (None:
    every core, :attr:`busy_service_cores`) and CPU weight ``service_weight_busy`` at once, an idle
    one ``service_cores_idle``; while its requests are in flight each training job's quota is at
    most ``serving_training_cores`` (:func:`~autoglm_rt.policy.scheduler.cpu_plan.quota_while_serving`);
    training jobs are guaranteed the rest by weight (in proportion to their requests times
    ``1 + urgency_cpu_weight x urgency``, at least ``min_training_cores`` each) and may use what
    the others leave idle; a job still starting (:attr:`TenantState.starting`) is given a whole
    core and ``starting_cpu_weight`` times its weight. ``max_running``:
    training jobs at once. ``preempt_urgency``: a pending job at least this urgent may preempt
    lower-scored running jobs when it does not fit. ``paused_cores``: the CPU quota of a job
    paused in place (1 ms per 100 ms period: the kernel's minimum)."""

    memory: int
    cores: float
    phase_shares: tuple[tuple[str, float], ...] = tuple(PHASE_SHARES.items())
    headroom: float = 0.15
    grow_when: float = 0.8
    grow_by: float = 1.35
    service_cores_busy: float | None = None
    service_cores_idle: float = 0.25
    service_weight_busy: int = 10000
    serving_training_cores: float = 0.01  # 1 ms per 100 ms period: the kernel's minimum quota
    urgency_cpu_weight: float = 4.0  # a training job's CPU weight scales with 1 + this x urgency
    starting_cpu_weight: float = 4.0  # ... and with this while it starts (one thread, nothing to spread)
    min_training_cores: float = 0.2
    max_running: int = 4
    preempt_urgency: float = 0.8
    aging_rate: float = 0.01
    paused_cores: float = 0.01

    def __post_init__(self) -> None:
        if self.memory <= 0 or not (math.isfinite(self.cores) and self.cores > 0):
            raise ValueError(f"PlannerConfig: memory and cores must be > 0, got {self.memory}, {self.cores}")
        if self.max_running < 1:
            raise ValueError(f"PlannerConfig: max_running must be >= 1, got {self.max_running}")
        if not (math.isfinite(self.starting_cpu_weight) and self.starting_cpu_weight >= 1):
            raise ValueError(f"PlannerConfig: starting_cpu_weight must be >= 1, got {self.starting_cpu_weight}")
        if not (math.isfinite(self.urgency_cpu_weight) and self.urgency_cpu_weight >= 0):
            raise ValueError(f"PlannerConfig: urgency_cpu_weight must be >= 0, got {self.urgency_cpu_weight}")
        if not (math.isfinite(self.serving_training_cores) and self.serving_training_cores > 0):
            raise ValueError(f"PlannerConfig: serving_training_cores must be > 0, got {self.serving_training_cores}")
        if not (math.isfinite(self.paused_cores) and self.paused_cores > 0):
            raise ValueError(f"PlannerConfig: paused_cores must be > 0, got {self.paused_cores}")
        busy = self.service_cores_busy
        if busy is not None and not (math.isfinite(busy) and busy > 0):
            raise ValueError(f"PlannerConfig: service_cores_busy must be > 0 or None, got {busy}")

    @property
    def busy_service_cores(self) -> float:
        """The CPU quota of a service with requests in flight: ``service_cores_busy``, at most
        ``cores``; every core when it is None (a burst of requests may use the whole machine;
        its weight, not its quota, keeps it first)."""
        busy = self.service_cores_busy
        return self.cores if busy is None else min(self.cores, busy)


@dataclass(frozen=True)
class TenantState:
    """What the planner knows of one tenant at one instant. Bytes and cores.

    ``kind``: "training" (admitted once, runs to the end) or "service" (always running; ``busy``
    when requests wait). ``request_memory``/``request_cpus``: what it asked for (its static
    partition). ``floor_memory``: its working set at the smallest micro-batch (never pushed below).
    ``peak``/``usage``/``limit``: measured, for running tenants; ``peak`` should be the highest
    over the last few seconds (several steps), not one instant. ``cpu_used``: cores it used over
    the last control period (from its group's CPU accounting; 0 when unknown). ``paused``: a
    running job held in place by a :attr:`ResourcePlan.pause` (process and memory kept, minimal
    CPU); it counts as running for memory, not for ``max_running``. ``progress``: the share of
    its steps a running job has done (0..1, from its status; None: unknown). ``starting``: a running
    job that has not finished its first step since it was started (interpreter, imports, model:
    one thread)."""

    name: str
    kind: str = "training"
    urgency: float = 0.5
    request_memory: int = 0
    request_cpus: float = 1.0
    floor_memory: int = 0
    submitted_at: float = 0.0
    running: bool = False
    preemptible: bool = True
    phase: str = "initial"
    busy: bool = False
    usage: int = 0
    peak: int = 0
    limit: int | None = None
    cpu_used: float = 0.0
    paused: bool = False
    progress: float | None = None
    starting: bool = False

    @property
    def before_first_step(self) -> bool:
        """A training job not past its first step: still waiting (admitted by this plan) or
        ``starting``. It runs at its full micro-batch and has measured nothing to adapt by."""
        return self.kind == "training" and (self.starting or not self.running)


@dataclass
class ResourcePlan:
    """What to do now: start ``admit`` (in order; a paused job in it resumes), stop ``preempt``
    (checkpoint and requeue), hold ``pause`` in place (dynamic only: process and memory kept, CPU
    quota ``paused_cores``, nothing to redo on resume), and give every running or admitted tenant
    ``memory[name]`` bytes, ``cpus[name]`` cores and (dynamic only) ``cpu_weights[name]``, its
    priority on contended cores."""

    admit: list[str] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)
    pause: list[str] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    cpus: dict[str, float] = field(default_factory=dict)
    cpu_weights: dict[str, int] = field(default_factory=dict)  # 100: the default; higher runs first


def tenant_score(t: TenantState, cfg: PlannerConfig, now: float) -> float:
    """The mission's score (as :meth:`PriorityScheduler.base_score`, dependencies met) plus aging."""
    return base_score(t, cfg) + cfg.aging_rate * max(0.0, now - t.submitted_at)


def base_score(t: TenantState, cfg: PlannerConfig) -> float:
    """The mission's score alone (urgency and resource ratio; dependencies met), without aging."""
    ratio = max(t.request_memory / cfg.memory, t.request_cpus / cfg.cores)
    return mission_score(t.urgency, ratio)
