"""The dynamic policy's CPU rules: a busy service gets its share and a high weight at once;
training jobs split the rest."""

from __future__ import annotations

from collections.abc import Sequence

from autoglm_rt.policy.scheduler.tenants import PlannerConfig, TenantState

__all__ = ["plan_cpus"]


def plan_cpus(live: Sequence[TenantState], cfg: PlannerConfig) -> tuple[dict[str, float], dict[str, int]]:
    """CPU quota (cores) and weight (100: the default) for every live tenant."""
    cpus: dict[str, float] = {}
    weights: dict[str, int] = {}
    service = [t for t in live if t.kind == "service"]
    train = [t for t in live if t.kind == "training"]
    for s in service:
        cpus[s.name] = cfg.service_cores_busy if s.busy else cfg.service_cores_idle
        # A quota only caps; on busy cores the weight is what lets urgent work run first.
        weights[s.name] = 1000 if s.busy else 100
    left = max(0.0, cfg.cores - sum(cpus.values()))
    asked = sum(t.request_cpus for t in train)
    for t in train:  # in proportion to the requests: idle cores go to whoever runs
        cpus[t.name] = max(cfg.min_training_cores, left * t.request_cpus / asked if asked else left / len(train))
        weights[t.name] = 100
    return cpus, weights
