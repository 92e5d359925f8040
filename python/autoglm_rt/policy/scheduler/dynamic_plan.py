"""The dynamic policy: admission by the mission's score, preemption for urgent work, then memory
(:mod:`.memory_plan`) and CPU (:mod:`.cpu_plan`) re-divided among the tenants that run."""

from __future__ import annotations

from collections.abc import Sequence

from autoglm_rt.policy.scheduler.cpu_plan import plan_cpus
from autoglm_rt.policy.scheduler.memory_plan import fit_memory, memory_floor, memory_want
from autoglm_rt.policy.scheduler.tenants import PlannerConfig, ResourcePlan, TenantState, base_score, tenant_score

__all__ = ["plan_dynamic"]


def plan_dynamic(tenants: Sequence[TenantState], cfg: PlannerConfig, now: float) -> ResourcePlan:
    """Re-divides memory and CPU among co-located tenants (see docs/scheduling.md):

    - memory: a running job wants its phase share of its request, never below its floor plus
      headroom, and ``peak * grow_by`` when its peak presses on its limit; pending jobs are
      admitted by score while their floor-plus-headroom fits; an urgent one that does not fit
      preempts the lowest-scored preemptible jobs (:func:`_victims`): paused in place when only
      ``max_running`` stands in its way (memory fits), stopped and requeued when memory is short;
      paused jobs resume first when a slot frees; what is left is spread as headroom;
    - CPU: see :func:`~autoglm_rt.policy.scheduler.cpu_plan.plan_cpus`.
    """
    plan = ResourcePlan()
    running = [t for t in tenants if t.running]
    want = {t.name: memory_want(t, cfg) for t in running}
    n_train = sum(1 for t in running if t.kind == "training" and not t.paused)
    # Paused jobs first (their memory is already held and their work half done), then by score.
    waiting = [t for t in tenants if not t.running or t.paused]
    waiting.sort(key=lambda t: (not t.paused, -tenant_score(t, cfg, now), t.name))
    for t in waiting:
        if t.paused:  # resumes as soon as a slot is free
            if n_train < cfg.max_running:
                plan.admit.append(t.name)
                n_train += 1
            continue
        need = memory_floor(t, cfg)
        committed = sum(memory_floor(r, cfg) for r in running if r.name not in plan.preempt) + sum(
            memory_floor(x, cfg) for x in tenants if x.name in plan.admit and not x.running
        )
        slots_full = t.kind == "training" and n_train >= cfg.max_running
        if slots_full and t.urgency < cfg.preempt_urgency:
            continue
        if committed + need > cfg.memory or slots_full:
            if t.urgency < cfg.preempt_urgency:
                continue
            chosen = _victims(t, running, [*plan.preempt, *plan.pause], committed, n_train, cfg, now)
            if chosen is None:
                continue
            if committed + need <= cfg.memory:  # only the slots are short: pause, nothing to redo
                plan.pause.extend(c.name for c in chosen)
            else:
                plan.preempt.extend(c.name for c in chosen)
            n_train -= len(chosen)
        plan.admit.append(t.name)
        want[t.name] = memory_want(t, cfg)
        n_train += t.kind == "training"
    live = [t for t in tenants if (t.running and t.name not in plan.preempt) or t.name in plan.admit]
    plan.memory = fit_memory(live, want, cfg)
    paused = {t.name for t in live if (t.paused and t.name not in plan.admit) or t.name in plan.pause}
    plan.cpus, plan.cpu_weights = plan_cpus([t for t in live if t.name not in paused], cfg)
    for name in paused:
        plan.cpus[name], plan.cpu_weights[name] = cfg.paused_cores, 1
    return plan


def _victims(
    t: TenantState,
    running: Sequence[TenantState],
    already: Sequence[str],
    committed: int,
    n_train: int,
    cfg: PlannerConfig,
    now: float,
) -> list[TenantState] | None:
    """The lowest-scored preemptible training jobs (score below ``t``'s by 0.05) whose floors,
    once freed, let ``t`` fit in memory and under ``max_running``; None if no such set exists.

    Victims go by the mission's score without aging (aging keeps a *waiting* job from starving;
    how long a running job has been in the system says nothing about what preempting it costs);
    among equal scores, the one nearest its end goes first: it has the most slack before the
    last job ends, and a pause delays any job's completion by the same time. A job that has done
    all its steps is ending and frees its slot by itself: it is never chosen."""
    need = memory_floor(t, cfg)
    score = tenant_score(t, cfg, now)
    victims = sorted(
        (
            r
            for r in running
            if r.preemptible
            and not r.paused
            and r.kind == "training"
            and r.name not in already
            and (r.progress is None or r.progress < 1.0)
            and tenant_score(r, cfg, now) + 0.05 < score
        ),
        key=lambda r: (round(base_score(r, cfg), 9), -(r.progress or 0.0), r.name),
    )

    def fits(chosen: list[TenantState]) -> bool:
        freed = sum(memory_floor(c, cfg) for c in chosen)
        return committed - freed + need <= cfg.memory and (
            t.kind != "training" or n_train - len(chosen) < cfg.max_running
        )

    chosen: list[TenantState] = []
    for v in victims:
        if fits(chosen):
            break
        chosen.append(v)
    return chosen if fits(chosen) else None
