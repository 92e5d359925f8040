"""Scheduling: priority scheduling of tasks over a machine's devices, and the planners that divide
one machine among co-located tenants.

- :mod:`.tasks`: :class:`Task`, :class:`Device`, :class:`TaskState`, the :class:`Plan` returned.
- :mod:`.score`: the mission's priority score (one formula for both).
- :mod:`.book`: the ledger of tasks (states, devices, ages, checkpoints).
- :mod:`.priority`: :class:`PriorityScheduler`: scores with aging, gang admission, reservation.
- :mod:`.victims`: which tasks to preempt, losing the least work.
- :mod:`.tenants`: :class:`PlannerConfig`, :class:`TenantState`, :class:`ResourcePlan`, phase shares.
- :mod:`.static_plan`: :func:`plan_static`, the fixed-partition baseline.
- :mod:`.dynamic_plan`: :func:`plan_dynamic`, admission and preemption, over
  :mod:`.memory_plan` (phase shares, floors, headroom) and :mod:`.cpu_plan` (quotas, weights).
"""

from __future__ import annotations

from autoglm_rt.policy.scheduler.book import TaskBook
from autoglm_rt.policy.scheduler.dynamic_plan import plan_dynamic
from autoglm_rt.policy.scheduler.priority import PriorityScheduler
from autoglm_rt.policy.scheduler.score import mission_score
from autoglm_rt.policy.scheduler.static_plan import plan_static
from autoglm_rt.policy.scheduler.tasks import (
    Device,
    Placement,
    Plan,
    Preemption,
    SchedulerError,
    Task,
    TaskRecord,
    TaskState,
)
from autoglm_rt.policy.scheduler.tenants import PHASE_SHARES, PlannerConfig, ResourcePlan, TenantState, tenant_score

__all__ = [
    "PHASE_SHARES",
    "Device",
    "Placement",
    "Plan",
    "PlannerConfig",
    "Preemption",
    "PriorityScheduler",
    "ResourcePlan",
    "SchedulerError",
    "Task",
    "TaskBook",
    "TaskRecord",
    "TaskState",
    "TenantState",
    "mission_score",
    "plan_dynamic",
    "plan_static",
    "tenant_score",
]
