"""Priority scheduling of tasks over a machine's devices: scores, dependencies, gang admission,
preemption with the least work lost, and aging so that nothing starves.

The scheduler is plain Python over numbers and a clock; it starts and stops nothing itself. A
caller (``autoglm_rt.jobqueue``, a test, a simulator) submits tasks, calls :meth:`PriorityScheduler.schedule`
periodically and carries out the returned :class:`Plan`: start the named tasks on the named devices,
ask the victims to stop (checkpoint and exit), and report back with :meth:`~PriorityScheduler.stopped`,
:meth:`~PriorityScheduler.finished` and :meth:`~PriorityScheduler.record_checkpoint`.

Score of a pending task (higher runs first)::

    0.5 * urgency + 0.3 / (1 + resource_ratio) + 0.2 / (1 + unmet_deps)
        + priority_weight * priority + aging_rate * seconds_since_submission

``resource_ratio`` is the task's largest share of one resource (devices, device memory, CPUs).
A task with unmet dependencies is not eligible at all. Age counts from submission, running or
not, so the order between two tasks never flips with time alone: an older task overtakes every
task submitted long enough after it (nothing starves), and a running task is never preempted just
because a waiting one got older (no thrashing). A pending task may preempt running ones only if
its score exceeds theirs by ``preemption_margin``, they are preemptible and have run
``min_runtime``. Victims are the set that loses the least work (seconds since each one's last
checkpoint), with no unneeded member. Devices are exclusive and a task gets all of its devices at
once or none (gang admission). A task that has waited ``reserve_after`` seconds reserves the free
devices it can use, so smaller tasks cannot keep
overtaking it; with the unbounded aging term this means every task eventually runs.

The ledger of tasks is :class:`~autoglm_rt.policy.scheduler.book.TaskBook`; the victim search is
:func:`~autoglm_rt.policy.scheduler.victims.least_work_victims`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

from autoglm_rt.policy.scheduler.book import TaskBook
from autoglm_rt.policy.scheduler.score import mission_score
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
from autoglm_rt.policy.scheduler.victims import least_work_victims

__all__ = ["PriorityScheduler"]


class PriorityScheduler(TaskBook):
    """Decides which tasks run where. Not thread-safe: call it from one thread.

    ``devices``: a count (devices 0..n-1, memory unbounded) or a sequence of :class:`Device` /
    indices. ``cpus``: CPUs to share (``math.inf`` if not limited). ``clock``: seconds, monotonic;
    every method also takes an explicit ``now`` for simulations and tests."""

    def __init__(
        self,
        devices: int | Sequence[Device | int],
        *,
        cpus: float = math.inf,
        aging_rate: float = 0.01,
        priority_weight: float = 0.25,
        preemption_margin: float = 0.05,
        reserve_after: float = 30.0,
        exact_victim_search: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(devices, cpus=cpus, clock=clock)
        for name, value in (("aging_rate", aging_rate), ("priority_weight", priority_weight)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if not (isinstance(preemption_margin, int | float) and math.isfinite(preemption_margin)):
            raise ValueError(f"preemption_margin: expected a finite number, got {preemption_margin!r}")
        if not (isinstance(reserve_after, int | float) and reserve_after >= 0):
            raise ValueError(f"reserve_after: expected seconds >= 0 (or math.inf), got {reserve_after!r}")
        self.aging_rate = float(aging_rate)
        self.priority_weight = float(priority_weight)
        self.preemption_margin = float(preemption_margin)
        self.reserve_after = float(reserve_after)
        self.exact_victim_search = int(exact_victim_search)

    def assign(self, name: str, devices: Sequence[int], now: float | None = None) -> None:
        """Starts a pending, eligible task on exactly ``devices`` (a migration's target), outside
        the score order. Raises SchedulerError if they are held, too few or too small."""
        e = self._get(name)
        if not self.is_eligible(name):
            raise SchedulerError(f"task {name!r} is {e.state.value} and not eligible; cannot assign it")
        devices = tuple(sorted(devices))
        self._check_devices_free(name, devices)
        if len(set(devices)) != e.task.gpus or self._fit(e.task, devices, math.inf) != devices:
            raise SchedulerError(f"task {name!r} needs {e.task.gpus} distinct device(s) it fits on, got {devices}")
        held_cpus = sum(
            x.task.cpus for x in self._entries.values() if x.state in (TaskState.RUNNING, TaskState.STOPPING)
        )
        if e.task.cpus > self.cpus - held_cpus + 1e-9:
            raise SchedulerError(f"task {name!r} needs {e.task.cpus} cpus; {self.cpus - held_cpus} are free")
        self._start(e, devices, self._now(now))

    def resource_ratio(self, task: Task) -> float:
        """The task's largest share of one of the machine's resources (0..1)."""
        shares = [task.gpus / len(self._devices) if self._devices else 0.0]
        if self._memory_known:
            shares.append(task.memory_bytes / max(d.memory for d in self._devices.values()))
        if math.isfinite(self.cpus) and self.cpus > 0:
            shares.append(task.cpus / self.cpus)
        return max(shares)

    def base_score(self, name: str) -> float:
        """The score without aging: urgency, resources, dependencies and priority class."""
        t = self._get(name).task
        return (
            mission_score(t.urgency, self.resource_ratio(t), self.unmet_dependencies(name))
            + self.priority_weight * t.priority
        )

    def score(self, name: str, now: float | None = None) -> float:
        """Base score plus ``aging_rate`` per second since submission."""
        return self.base_score(name) + self.aging_rate * self.age(name, now)

    # ---------------------------------------------------------------- the decision

    def schedule(self, now: float | None = None, *, exclude: Iterable[int] = ()) -> Plan:
        """Re-evaluates every pending task (scores age with time) and decides what starts and what
        is preempted. Started tasks are marked running and victims stopping at once; the caller
        must carry the plan out and report back. ``exclude``: free devices not to hand out now
        (held for a migration)."""
        now = self._now(now)
        plan = Plan()
        held_devices = {i for e in self._entries.values() for i in e.devices} | set(exclude)
        free = [i for i in self._devices if i not in held_devices]
        free_cpus = self.cpus - sum(
            e.task.cpus for e in self._entries.values() if e.state in (TaskState.RUNNING, TaskState.STOPPING)
        )
        reserved: set[int] = set()
        reserved_cpus = 0.0
        candidates = [n for n in self._entries if self.is_eligible(n)]
        candidates.sort(key=lambda n: (-self.score(n, now), self._entries[n].order))
        for name in candidates:
            e = self._entries[name]
            avail = [i for i in free if i not in reserved]
            avail_cpus = free_cpus - reserved_cpus
            placement = self._fit(e.task, avail, avail_cpus)
            if placement is not None:
                self._start(e, placement, now)
                plan.start.append(Placement(name, placement))
                free = [i for i in free if i not in placement]
                free_cpus -= e.task.cpus
                continue
            # Victims already stopping for this task count as its own.
            incoming = [v for v in self._entries.values() if v.state is TaskState.STOPPING and v.preempted_for == name]
            inc_devs = [i for v in incoming for i in v.devices]
            inc_cpus = sum(v.task.cpus for v in incoming)
            claim = self._fit(e.task, avail + inc_devs, avail_cpus + inc_cpus)
            if claim is None and e.task.preempts:
                victims = self._choose_victims(e, avail + inc_devs, avail_cpus + inc_cpus, now)
                if victims is not None:
                    for v in victims:
                        v.state, v.preempted_for = TaskState.STOPPING, name
                        v.preemptions += 1
                        plan.preempt.append(Preemption(v.task.name, name, self.work_lost(v.task.name, now)))
                    claim = self._fit(
                        e.task,
                        avail + inc_devs + [i for v in victims for i in v.devices],
                        avail_cpus + inc_cpus + sum(v.task.cpus for v in victims),
                    )
            if claim is not None or self.age(name, now) >= self.reserve_after:
                # Hold the free devices it will use, so smaller tasks cannot overtake it.
                usable = claim if claim is not None else self._usable(e.task, avail)[: e.task.gpus]
                mine = [i for i in usable if i in avail]
                reserved.update(mine)
                reserved_cpus += max(0.0, min(e.task.cpus - inc_cpus, avail_cpus))
        return plan

    # ---------------------------------------------------------------- internals

    def _usable(self, task: Task, devices: Iterable[int]) -> list[int]:
        """Devices with enough memory, smallest first (keep big devices for big tasks)."""
        ok = [i for i in devices if self._devices[i].memory >= task.memory_bytes]
        return sorted(ok, key=lambda i: (self._devices[i].memory, i))

    def _fit(self, task: Task, devices: Sequence[int], cpus: float) -> tuple[int, ...] | None:
        """All of the task's devices from ``devices`` (gang), or None."""
        if task.cpus > cpus + 1e-9:
            return None
        usable = self._usable(task, devices)
        if len(usable) < task.gpus:
            return None
        return tuple(sorted(usable[: task.gpus]))

    def _choose_victims(self, e: TaskRecord, devices: list[int], cpus: float, now: float) -> list[TaskRecord] | None:
        """The set of running tasks losing the least work whose stopping lets ``e`` fit, or None."""
        score = self.score(e.task.name, now)
        pool = [
            v
            for v in self._entries.values()
            if v.state is TaskState.RUNNING
            and v.task.preemptible
            and now - v.started_at >= v.task.min_runtime
            and self.score(v.task.name, now) + self.preemption_margin < score
            and (any(self._devices[i].memory >= e.task.memory_bytes for i in v.devices) or v.task.cpus > 0)
        ]

        def fits(vs: list[TaskRecord]) -> bool:
            freed = devices + [i for v in vs for i in v.devices]
            return self._fit(e.task, freed, cpus + sum(v.task.cpus for v in vs)) is not None

        return least_work_victims(
            pool,
            fits,
            lost=lambda v: self.work_lost(v.task.name, now),
            score=lambda v: self.score(v.task.name, now),
            order=lambda v: v.order,
            exact_limit=self.exact_victim_search,
        )
