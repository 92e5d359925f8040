"""The dynamic policy's CPU rules: work-conserving quotas, weights for who runs first.

A CFS quota is a cap and a weight (``cpu.shares`` / ``cpu.weight``) decides who runs when cores are
contended, so:

- a busy service gets ``busy_service_cores`` (by default every core) and weight
  ``service_weight_busy`` at once (it runs before any training thread); an idle one keeps
  ``service_cores_idle`` and the default weight;
- each training job's *guaranteed* share is the cores the service does not reserve, divided in
  proportion to the requests (at least ``min_training_cores``); its weight is its request times
  ``1 + urgency_cpu_weight x urgency``, scaled to a mean of 100, so urgent work runs first on
  contended cores (an urgent job is usually also the last to arrive, so it finishing sooner
  shortens the makespan: no lone job left at the end on one thread);
- its quota (the cap) is that share or, when larger, what every other tenant left unused over the
  last period (``cores - sum of the others' cpu_used``): idle cores are lent, never wasted. Quotas
  may therefore sum to more than ``cores``; the weights arbitrate when all want more;
- a job still starting (interpreter, imports, model build: one thread) gets a whole core and
  ``starting_cpu_weight`` times its weight: that part of its work can use one core only and lies
  on its path to the end, while running jobs' steps can later spread over cores others free, so
  stretching a start over a shared core delays the last job's end (the makespan);
- while the service has requests in flight, every training job yields: its quota is at most
  ``serving_training_cores`` (:func:`quota_while_serving`) from the moment a request is sent to
  the moment the last one is answered (event-driven, not per period: requests last milliseconds).
  A weight alone does not do it: a service running on every core with many-threaded training
  jobs beside it waits at its own thread barriers (measured: p95 60 ms against 16 ms).

The tenant derives its thread count from its quota (``resources.cpu_quota_cores()``), so a job
lent whole idle cores can use them.
"""

from __future__ import annotations

from collections.abc import Sequence

from autoglm_rt.policy.scheduler.tenants import PlannerConfig, TenantState

__all__ = ["plan_cpus", "quota_while_serving"]

DEFAULT_WEIGHT = 100


def plan_cpus(live: Sequence[TenantState], cfg: PlannerConfig) -> tuple[dict[str, float], dict[str, int]]:
    """CPU quota (cores) and weight (``DEFAULT_WEIGHT`` = 100: the default) for every live tenant."""
    cpus: dict[str, float] = {}
    weights: dict[str, int] = {}
    service = [t for t in live if t.kind == "service"]
    train = [t for t in live if t.kind == "training"]
    for s in service:
        cpus[s.name] = cfg.busy_service_cores if s.busy else cfg.service_cores_idle
        weights[s.name] = cfg.service_weight_busy if s.busy else DEFAULT_WEIGHT
    left = max(0.0, cfg.cores - sum(cpus.values()))
    asked = sum(t.request_cpus for t in train)
    used = sum(max(0.0, t.cpu_used) for t in live)
    claim = {
        t.name: t.request_cpus
        * (1.0 + cfg.urgency_cpu_weight * t.urgency)
        * (cfg.starting_cpu_weight if t.before_first_step else 1.0)
        for t in train
    }
    mean_claim = sum(claim.values()) / len(train) if train else 0.0
    for t in train:
        share = left * t.request_cpus / asked if asked else left / len(train)
        share = max(cfg.min_training_cores, share)
        idle = cfg.cores - (used - max(0.0, t.cpu_used))
        cpus[t.name] = min(cfg.cores, max(share, idle, 1.0 if t.before_first_step else 0.0))
        weight = DEFAULT_WEIGHT * claim[t.name] / mean_claim if mean_claim > 0 else DEFAULT_WEIGHT
        weights[t.name] = max(1, min(10000, round(weight)))
    return cpus, weights


def quota_while_serving(planned: float, serving: bool, cfg: PlannerConfig) -> float:
    """A training job's CPU quota (cores): ``planned`` (its period's plan), capped at
    ``cfg.serving_training_cores`` while the service has requests in flight."""
    return min(planned, cfg.serving_training_cores) if serving else planned
