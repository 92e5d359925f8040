"""Obviously-correct references for the scheduler tests: the score formula written out, a
brute-force minimal victim set, and a step simulator that runs a scheduler over a task stream."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from autoglm_rt.policy.scheduler.priority import PriorityScheduler
from autoglm_rt.policy.scheduler.tasks import Task, TaskState


def reference_score(
    urgency: float, resource_ratio: float, unmet_deps: int, priority: int, age: float, aging: float, pw: float
) -> float:
    return 0.5 * urgency + 0.3 / (1 + resource_ratio) + 0.2 / (1 + unmet_deps) + pw * priority + aging * age


def brute_force_min_lost(
    free: list[int],
    running: dict[str, tuple[list[int], float]],
    need: int,
) -> float | None:
    """Least total work lost over every subset of ``running`` (name -> (devices, work lost))
    whose devices plus ``free`` give at least ``need`` devices; None if no subset does."""
    best: float | None = None
    names = list(running)
    for k in range(len(names) + 1):
        for combo in itertools.combinations(names, k):
            devices = len(free) + sum(len(running[n][0]) for n in combo)
            if devices >= need:
                lost = sum(running[n][1] for n in combo)
                best = lost if best is None else min(best, lost)
    return best


@dataclass
class SimResult:
    finished_at: dict[str, float] = field(default_factory=dict)
    first_start: dict[str, float] = field(default_factory=dict)
    max_devices_in_use: int = 0


def simulate(
    sched: PriorityScheduler,
    arrivals: list[tuple[float, Task, float]],
    *,
    horizon: float,
    dt: float = 1.0,
    until: Callable[[SimResult], bool] | None = None,
) -> SimResult:
    """Runs ``sched`` in steps of ``dt``: ``arrivals`` are (time, task, seconds of work). A running
    task checkpoints never, so a preempted task starts its work over. Checks at every step that no
    device is held twice and that every started task got all of its devices."""
    result = SimResult()
    pending_arrivals = sorted(arrivals, key=lambda a: a[0])
    work = {t.name: w for _, t, w in arrivals}
    done_work: dict[str, float] = {}
    now = 0.0
    i = 0
    while now <= horizon:
        while i < len(pending_arrivals) and pending_arrivals[i][0] <= now:
            sched.submit(pending_arrivals[i][1], now)
            i += 1
        # Victims stop at once (their work is lost).
        for name in sched.names(TaskState.STOPPING):
            sched.stopped(name, now)
            done_work.pop(name, None)
        plan = sched.schedule(now)
        for p in plan.start:
            assert len(p.devices) == sched.task(p.task).gpus, "gang admission violated"
            result.first_start.setdefault(p.task, now)
            done_work[p.task] = 0.0
        for p in plan.preempt:
            sched.stopped(p.victim, now)
            done_work.pop(p.victim, None)
        held = [d for n in sched.names(TaskState.RUNNING) for d in sched.devices_of(n)]
        assert len(held) == len(set(held)), "a device is held twice"
        result.max_devices_in_use = max(result.max_devices_in_use, len(held))
        now += dt
        for name in sched.names(TaskState.RUNNING):
            done_work[name] = done_work.get(name, 0.0) + dt
            if done_work[name] >= work[name]:
                sched.finished(name, True, now)
                result.finished_at[name] = now
                del done_work[name]
        if until is not None and until(result):
            break
    return result
