"""The static baseline: fixed partitions sized by request, first come first served, no resize."""

from __future__ import annotations

from collections.abc import Sequence

from autoglm_rt.policy.scheduler.tenants import PlannerConfig, ResourcePlan, TenantState

__all__ = ["plan_static"]


def plan_static(tenants: Sequence[TenantState], cfg: PlannerConfig) -> ResourcePlan:
    """Fixed partitions: every tenant gets exactly what it requested, admitted first come first
    served when its partition fits beside the running ones; nothing is resized or preempted."""
    plan = ResourcePlan()
    running = [t for t in tenants if t.running]
    used_mem = sum(t.request_memory for t in running)
    used_cpu = sum(t.request_cpus for t in running)
    n_train = sum(1 for t in running if t.kind == "training")
    for t in sorted((t for t in tenants if not t.running), key=lambda t: (t.submitted_at, t.name)):
        fits = used_mem + t.request_memory <= cfg.memory and used_cpu + t.request_cpus <= cfg.cores + 1e-9
        if not fits or (t.kind == "training" and n_train >= cfg.max_running):
            break  # FIFO: nobody overtakes the head of the queue
        plan.admit.append(t.name)
        used_mem += t.request_memory
        used_cpu += t.request_cpus
        n_train += t.kind == "training"
    for t in tenants:
        if t.running or t.name in plan.admit:
            plan.memory[t.name] = t.request_memory
            plan.cpus[t.name] = t.request_cpus
    return plan
