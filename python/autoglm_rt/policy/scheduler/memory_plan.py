"""The dynamic policy's memory rules: a tenant's floor, what it wants now (phase share, growth
when pressed, no flapping), and fitting all wants into the machine's memory."""

from __future__ import annotations

from collections.abc import Sequence

from autoglm_rt.policy.scheduler.tenants import PlannerConfig, TenantState

__all__ = ["fit_memory", "memory_floor", "memory_want"]


def memory_floor(t: TenantState, cfg: PlannerConfig) -> int:
    """Never pushed below: the working set at the smallest micro-batch plus ``cfg.headroom``; for
    a training job not past its first step, at least its request. Until that step it runs at its
    full micro-batch and cannot adapt: a job admitted into its floor at micro-batch 1 was
    OOM-killed in its first step (full trace, an urgent gpt-m given 279 MiB)."""
    floor = int(t.floor_memory * (1.0 + cfg.headroom))
    return max(floor, t.request_memory) if t.before_first_step else floor


def memory_want(t: TenantState, cfg: PlannerConfig) -> int:
    """Bytes the tenant should have now: its phase share of its request, at least its floor;
    ``peak * grow_by`` when its peak presses on its limit; and not below what it recently used
    with the same margin (lowering a limit the job just grew into would flap: grow, lower, grow,
    and kill it at the low point)."""
    shares = dict(cfg.phase_shares)
    want = max(memory_floor(t, cfg), int(shares.get(t.phase, 1.0) * t.request_memory))
    if t.running and t.limit:
        if t.peak > cfg.grow_when * t.limit:
            want = max(want, int(t.peak * cfg.grow_by))
        else:
            want = max(want, min(t.limit, int(t.peak * cfg.grow_by)))
    return want


def fit_memory(live: Sequence[TenantState], want: dict[str, int], cfg: PlannerConfig) -> dict[str, int]:
    """Every live tenant's limit: when the wants exceed ``cfg.memory``, what is above the floors is
    cut in proportion (floors are kept); otherwise the spare memory is spread in proportion to the
    wants as headroom. The result never sums above ``cfg.memory`` unless the floors alone do."""
    floors = {t.name: memory_floor(t, cfg) for t in live}
    out = {t.name: want[t.name] for t in live}
    total = sum(out.values())
    if total > cfg.memory:
        above = sum(out[n] - floors[n] for n in out)
        room = max(0, cfg.memory - sum(floors.values()))
        for n in out:
            out[n] = floors[n] + (int((out[n] - floors[n]) * room / above) if above else 0)
    else:
        spare = cfg.memory - total
        for n in out:
            out[n] += int(spare * out[n] / total) if total else 0
    return out
