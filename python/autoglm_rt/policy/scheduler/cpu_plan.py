"""The dynamic policy's CPU rules: work-conserving quotas, weights for who runs first.

A CFS quota is a cap and a weight (``cpu.shares`` / ``cpu.weight``) decides who runs when cores are
contended, so:

- a busy service gets ``service_cores_busy`` and weight ``service_weight_busy`` at once (it runs
  before any training thread); an idle one keeps ``service_cores_idle`` and the default weight;
- each training job's *guaranteed* share is the cores the service does not reserve, divided in
  proportion to the requests (at least ``min_training_cores``), expressed as its weight;
- its quota (the cap) is that share or, when larger, what every other tenant left unused over the
  last period (``cores - sum of the others' cpu_used``): idle cores are lent, never wasted. Quotas
  may therefore sum to more than ``cores``; the weights arbitrate when all want more.

The tenant derives its thread count from its quota (``resources.cpu_quota_cores()``), so a job
lent whole idle cores can use them.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoglm_rt.policy.scheduler.tenants import PlannerConfig, TenantState

__all__ = ["plan_cpus"]

DEFAULT_WEIGHT = 100


def plan_cpus(live: Sequence[TenantState], cfg: PlannerConfig) -> tuple[dict[str, float], dict[str, int]]:
    """CPU quota (cores) and weight (``DEFAULT_WEIGHT`` = 100: the default) for every live tenant."""
    cpus: dict[str, float] = {}
    weights: dict[str, int] = {}
    service = [t for t in live if t.kind == "service"]
    train = [t for t in live if t.kind == "training"]
    for s in service:
        cpus[s.name] = cfg.service_cores_busy if s.busy else cfg.service_cores_idle
        weights[s.name] = cfg.service_weight_busy if s.busy else DEFAULT_WEIGHT
    left = max(0.0, cfg.cores - sum(cpus.values()))
    asked = sum(t.request_cpus for t in train)
    used = sum(max(0.0, t.cpu_used) for t in live)
    for t in train:
        share = left * t.request_cpus / asked if asked else left / len(train)
        share = max(cfg.min_training_cores, share)
        idle = cfg.cores - (used - max(0.0, t.cpu_used))
        cpus[t.name] = min(cfg.cores, max(share, idle))
        mean = asked / len(train) if asked else 1.0
        weights[t.name] = max(1, min(10000, round(DEFAULT_WEIGHT * t.request_cpus / mean))) if asked else DEFAULT_WEIGHT
    return cpus, weights
