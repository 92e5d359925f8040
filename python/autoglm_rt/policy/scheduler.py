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
``min_runtime``. Victims are the set that
loses the least work (seconds since each one's last checkpoint), with no unneeded member. Devices
are exclusive and a task gets all of its devices at once or none (gang admission). A task that has
waited ``reserve_after`` seconds reserves the free devices it can use, so smaller tasks cannot keep
overtaking it; with the unbounded aging term this means every task eventually runs.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from autoglm_rt.units import parse_size

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
    "TaskState",
    "TenantState",
    "plan_dynamic",
    "plan_static",
    "tenant_score",
]


class SchedulerError(ValueError):
    """A request the scheduler cannot honour (unknown task, a task that can never fit, ...)."""


class TaskState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    STOPPING = "stopping"  # asked to stop for a preemption; still holds its devices
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True)
class Device:
    """One exclusive device slot (a GPU or a CPU slot) with its memory capacity in bytes."""

    index: int
    memory: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.index, bool) or not isinstance(self.index, int) or self.index < 0:
            raise TypeError(f"Device.index: expected a non-negative int, got {self.index!r}")
        object.__setattr__(self, "memory", parse_size(self.memory, name="Device.memory"))


@dataclass(frozen=True)
class Task:
    """What a task needs and how it may be treated.

    ``gpus``: devices it needs, all at once (0: CPU only). ``gpu_memory``: bytes it needs on each of
    them (int or "12Gi"). ``priority``: priority class (higher wins; each level adds
    ``priority_weight`` to the score). ``preemptible``: may be stopped for another task.
    ``preempts``: may stop others (False is Kubernetes' ``preemptionPolicy: Never``).
    ``min_runtime``: seconds it runs before it may be preempted."""

    name: str
    urgency: float = 0.5
    gpus: int = 1
    gpu_memory: int | str = 0
    cpus: float = 0.0
    depends_on: tuple[str, ...] = ()
    priority: int = 0
    preemptible: bool = True
    preempts: bool = True
    min_runtime: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Task.name: expected a non-empty string, got {self.name!r}")
        _check_real(self.urgency, "urgency", self.name)
        if not 0.0 <= self.urgency <= 1.0:
            raise ValueError(f"task {self.name!r}: urgency must be in [0, 1], got {self.urgency}")
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"task {self.name!r}: gpus must be a non-negative int, got {self.gpus!r}")
        object.__setattr__(self, "gpu_memory", parse_size(self.gpu_memory, name=f"task {self.name!r}: gpu_memory"))
        _check_real(self.cpus, "cpus", self.name)
        if self.cpus < 0:
            raise ValueError(f"task {self.name!r}: cpus must be >= 0, got {self.cpus}")
        if isinstance(self.depends_on, str):
            raise TypeError(f"task {self.name!r}: depends_on must be a sequence of names, not one string")
        object.__setattr__(self, "depends_on", tuple(self.depends_on))
        if self.name in self.depends_on:
            raise ValueError(f"task {self.name!r}: depends on itself")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise TypeError(f"task {self.name!r}: priority must be an int, got {self.priority!r}")
        _check_real(self.min_runtime, "min_runtime", self.name)
        if self.min_runtime < 0:
            raise ValueError(f"task {self.name!r}: min_runtime must be >= 0 seconds, got {self.min_runtime}")
        if self.gpus == 0 and self.cpus == 0:
            raise ValueError(f"task {self.name!r}: needs at least one device or some cpus")

    @property
    def memory_bytes(self) -> int:
        """``gpu_memory`` in bytes (it is parsed when the task is made)."""
        return int(self.gpu_memory)


def _check_real(value: object, what: str, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"task {name!r}: {what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"task {name!r}: {what} must be finite, got {value}")


@dataclass(frozen=True)
class Placement:
    """Start ``task`` on ``devices`` (indices)."""

    task: str
    devices: tuple[int, ...]


@dataclass(frozen=True)
class Preemption:
    """Stop ``victim`` (checkpoint, exit) so that ``for_task`` can run; ``work_lost`` in seconds."""

    victim: str
    for_task: str
    work_lost: float


@dataclass
class Plan:
    """What one :meth:`PriorityScheduler.schedule` call decided."""

    start: list[Placement] = field(default_factory=list)
    preempt: list[Preemption] = field(default_factory=list)


@dataclass
class _Entry:
    task: Task
    order: int
    state: TaskState = TaskState.PENDING
    submitted_at: float = 0.0
    started_at: float = 0.0
    last_checkpoint: float = -math.inf
    devices: tuple[int, ...] = ()
    preempted_for: str | None = None
    starts: int = 0
    preemptions: int = 0


class PriorityScheduler:
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
        if isinstance(devices, bool):
            raise TypeError("devices: expected a count or a sequence of Device, got a bool")
        if isinstance(devices, int):
            if devices < 0:
                raise ValueError(f"devices: expected a non-negative count, got {devices}")
            devs = [Device(i, 0) for i in range(devices)]
        else:
            devs = [d if isinstance(d, Device) else Device(d) for d in devices]
        if len({d.index for d in devs}) != len(devs):
            raise ValueError(f"devices: indices must be unique, got {[d.index for d in devs]}")
        unbounded = all(d.memory == 0 for d in devs)
        self._devices = {d.index: Device(d.index, 2**62 if unbounded else d.memory) for d in devs}
        self._memory_known = not unbounded
        for name, value in (("aging_rate", aging_rate), ("priority_weight", priority_weight)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if not (isinstance(cpus, int | float) and cpus >= 0) or cpus != cpus:
            raise ValueError(f"cpus: expected a number >= 0 or math.inf, got {cpus!r}")
        if not (isinstance(preemption_margin, int | float) and math.isfinite(preemption_margin)):
            raise ValueError(f"preemption_margin: expected a finite number, got {preemption_margin!r}")
        if not (isinstance(reserve_after, int | float) and reserve_after >= 0):
            raise ValueError(f"reserve_after: expected seconds >= 0 (or math.inf), got {reserve_after!r}")
        self.cpus = float(cpus)
        self.aging_rate = float(aging_rate)
        self.priority_weight = float(priority_weight)
        self.preemption_margin = float(preemption_margin)
        self.reserve_after = float(reserve_after)
        self.exact_victim_search = int(exact_victim_search)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._order = itertools.count()

    # ---------------------------------------------------------------- inputs

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(self._devices.values())

    def submit(self, task: Task, now: float | None = None, *, submitted_at: float | None = None) -> None:
        """Adds a pending task. ``submitted_at`` (default ``now``): when it was first submitted, so a
        restarted runner's queue keeps its age. Raises SchedulerError for a duplicate name or a task that no set of
        this machine's devices could ever hold."""
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a Task, got {type(task).__name__}")
        if task.name in self._entries:
            raise SchedulerError(f"task {task.name!r} was already submitted")
        usable = [d for d in self._devices.values() if d.memory >= task.memory_bytes]
        if task.gpus > len(usable):
            raise SchedulerError(
                f"task {task.name!r} needs {task.gpus} device(s) with {task.memory_bytes} bytes each; "
                f"this machine has {len(usable)} such device(s) of {len(self._devices)}"
            )
        if task.cpus > self.cpus:
            raise SchedulerError(f"task {task.name!r} needs {task.cpus} cpus; this machine has {self.cpus}")
        now = self._now(now)
        since = now if submitted_at is None else float(submitted_at)
        self._entries[task.name] = _Entry(task, next(self._order), submitted_at=since)

    def adopt_running(
        self,
        task: Task,
        devices: Sequence[int],
        started_at: float,
        now: float | None = None,
        *,
        submitted_at: float | None = None,
    ) -> None:
        """Registers a task that is already running on ``devices`` (a restarted runner found it)."""
        self.submit(task, now, submitted_at=submitted_at)
        e = self._entries[task.name]
        self._check_devices_free(task.name, devices)
        e.state, e.devices, e.started_at, e.starts = TaskState.RUNNING, tuple(devices), started_at, 1

    def finished(self, name: str, succeeded: bool = True, now: float | None = None) -> list[str]:
        """A running (or stopping) task exited for good. Returns the names of pending tasks that
        can now never run because they depend on a failed task; they are marked failed."""
        e = self._get(name)
        if e.state not in (TaskState.RUNNING, TaskState.STOPPING, TaskState.PENDING):
            raise SchedulerError(f"task {name!r} is {e.state.value}; cannot finish it")
        e.state = TaskState.SUCCEEDED if succeeded else TaskState.FAILED
        e.devices = ()
        return [] if succeeded else self._fail_dependents()

    def stopped(self, name: str, now: float | None = None) -> None:
        """A running or stopping task exited to be run again later (preempted, migrated, killed
        by a membership change): it releases its devices and waits again, keeping its age."""
        e = self._get(name)
        if e.state not in (TaskState.RUNNING, TaskState.STOPPING):
            raise SchedulerError(f"task {name!r} is {e.state.value}; only a running task can stop")
        e.state, e.devices, e.preempted_for = TaskState.PENDING, (), None

    def request_stop(self, name: str) -> None:
        """Marks a running task as stopping (the caller will stop it, e.g. to migrate it)."""
        e = self._get(name)
        if e.state is not TaskState.RUNNING:
            raise SchedulerError(f"task {name!r} is {e.state.value}; only a running task can be stopped")
        e.state = TaskState.STOPPING

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

    def record_checkpoint(self, name: str, now: float | None = None) -> None:
        """The task saved a checkpoint: stopping it now loses only the work done since."""
        self._get(name).last_checkpoint = self._now(now)

    # ---------------------------------------------------------------- queries

    def state(self, name: str) -> TaskState:
        return self._get(name).state

    def devices_of(self, name: str) -> tuple[int, ...]:
        return self._get(name).devices

    def task(self, name: str) -> Task:
        return self._get(name).task

    def names(self, state: TaskState | None = None) -> list[str]:
        """Task names in submission order, optionally only those in ``state``."""
        return [n for n, e in self._entries.items() if state is None or e.state is state]

    def age(self, name: str, now: float | None = None) -> float:
        """Seconds since the task was first submitted."""
        return max(0.0, self._now(now) - self._get(name).submitted_at)

    def unmet_dependencies(self, name: str) -> int:
        e = self._get(name)
        return sum(
            1 for d in e.task.depends_on if d not in self._entries or self._entries[d].state is not TaskState.SUCCEEDED
        )

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
            0.5 * t.urgency
            + 0.3 / (1.0 + self.resource_ratio(t))
            + 0.2 / (1.0 + self.unmet_dependencies(name))
            + self.priority_weight * t.priority
        )

    def score(self, name: str, now: float | None = None) -> float:
        """Base score plus ``aging_rate`` per second since submission."""
        return self.base_score(name) + self.aging_rate * self.age(name, now)

    def work_lost(self, name: str, now: float | None = None) -> float:
        """Seconds of work a running task would lose if stopped now."""
        e = self._get(name)
        if e.state not in (TaskState.RUNNING, TaskState.STOPPING):
            return 0.0
        return max(0.0, self._now(now) - max(e.started_at, e.last_checkpoint))

    def is_eligible(self, name: str) -> bool:
        """Pending with every dependency succeeded."""
        return self._get(name).state is TaskState.PENDING and self.unmet_dependencies(name) == 0

    def free_devices(self) -> list[int]:
        held = {i for e in self._entries.values() for i in e.devices}
        return [i for i in self._devices if i not in held]

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

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def _get(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise SchedulerError(f"unknown task {name!r}") from None

    def _check_devices_free(self, name: str, devices: Iterable[int]) -> None:
        held = {i for n, e in self._entries.items() if n != name for i in e.devices}
        for i in devices:
            if i not in self._devices:
                raise SchedulerError(f"task {name!r}: device {i} does not exist")
            if i in held:
                raise SchedulerError(f"task {name!r}: device {i} is held by another task")

    def _start(self, e: _Entry, devices: tuple[int, ...], now: float) -> None:
        e.state, e.devices, e.started_at = TaskState.RUNNING, devices, now
        e.starts += 1

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

    def _choose_victims(self, e: _Entry, devices: list[int], cpus: float, now: float) -> list[_Entry] | None:
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
        if not pool:
            return None

        def fits(vs: Iterable[_Entry]) -> bool:
            vs = list(vs)
            return (
                self._fit(e.task, devices + [i for v in vs for i in v.devices], cpus + sum(v.task.cpus for v in vs))
                is not None
            )

        if not fits(pool):
            return None
        lost = {id(v): self.work_lost(v.task.name, now) for v in pool}
        if len(pool) <= self.exact_victim_search:
            best: tuple[float, int, float] | None = None
            chosen: list[_Entry] = []
            for k in range(1, len(pool) + 1):
                for combo in itertools.combinations(pool, k):
                    key = (sum(lost[id(v)] for v in combo), k, sum(self.score(v.task.name, now) for v in combo))
                    if (best is None or key < best) and fits(combo):
                        best, chosen = key, list(combo)
        else:
            chosen = []
            for v in sorted(pool, key=lambda v: (lost[id(v)], self.score(v.task.name, now), v.order)):
                chosen.append(v)
                if fits(chosen):
                    break
        # Drop any victim that is not needed, the most expensive first.
        for v in sorted(chosen, key=lambda v: -lost[id(v)]):
            rest = [w for w in chosen if w is not v]
            if fits(rest):
                chosen = rest
        return chosen

    def _fail_dependents(self) -> list[str]:
        failed: list[str] = []
        changed = True
        while changed:
            changed = False
            for n, e in self._entries.items():
                if e.state is not TaskState.PENDING:
                    continue
                bad = [
                    d for d in e.task.depends_on if d in self._entries and self._entries[d].state is TaskState.FAILED
                ]
                if bad:
                    e.state = TaskState.FAILED
                    failed.append(n)
                    changed = True
        return failed


# ==================================================================== co-located tenants

#: Share of a job's requested memory its limit follows in each phase (the mission's rule).
PHASE_SHARES: dict[str, float] = {"initial": 0.9, "convergence": 0.6, "fine_tuning": 0.3}


@dataclass(frozen=True)
class PlannerConfig:
    """The machine given to tenants and the dynamic policy's knobs.

    ``memory`` (bytes) and ``cores``: what all tenants share. ``headroom``: a job's limit never goes
    below ``floor * (1 + headroom)``. A job whose peak exceeds ``grow_when`` of its limit is given
    ``peak * grow_by`` when memory is free. A busy service gets ``service_cores_busy`` cores at once,
    an idle one ``service_cores_idle``; training jobs share the rest, at least ``min_training_cores``
    each. ``max_running``: training jobs at once. ``preempt_urgency``: a pending job at least this
    urgent may preempt lower-scored running jobs when it does not fit."""

    memory: int
    cores: float
    phase_shares: tuple[tuple[str, float], ...] = tuple(PHASE_SHARES.items())
    headroom: float = 0.15
    grow_when: float = 0.8
    grow_by: float = 1.35
    service_cores_busy: float = 1.0
    service_cores_idle: float = 0.25
    min_training_cores: float = 0.2
    max_running: int = 4
    preempt_urgency: float = 0.8
    aging_rate: float = 0.01

    def __post_init__(self) -> None:
        if self.memory <= 0 or not (math.isfinite(self.cores) and self.cores > 0):
            raise ValueError(f"PlannerConfig: memory and cores must be > 0, got {self.memory}, {self.cores}")
        if self.max_running < 1:
            raise ValueError(f"PlannerConfig: max_running must be >= 1, got {self.max_running}")


@dataclass(frozen=True)
class TenantState:
    """What the planner knows of one tenant at one instant. Bytes and cores.

    ``kind``: "training" (admitted once, runs to the end) or "service" (always running; ``busy``
    when requests wait). ``request_memory``/``request_cpus``: what it asked for (its static
    partition). ``floor_memory``: its working set at the smallest micro-batch (never pushed below).
    ``peak``/``usage``/``limit``: measured, for running tenants; ``peak`` should be the highest
    over the last few seconds (several steps), not one instant."""

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


@dataclass
class ResourcePlan:
    """What to do now: start ``admit`` (in order), stop ``preempt`` (checkpoint and requeue), and
    give every running or admitted tenant ``memory[name]`` bytes, ``cpus[name]`` cores and (dynamic
    only) ``cpu_weights[name]``, its priority on contended cores."""

    admit: list[str] = field(default_factory=list)
    preempt: list[str] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    cpus: dict[str, float] = field(default_factory=dict)
    cpu_weights: dict[str, int] = field(default_factory=dict)  # 100: the default; higher runs first


def tenant_score(t: TenantState, cfg: PlannerConfig, now: float) -> float:
    """The mission's score (as :meth:`PriorityScheduler.base_score`, dependencies met) plus aging."""
    ratio = max(t.request_memory / cfg.memory, t.request_cpus / cfg.cores)
    return 0.5 * t.urgency + 0.3 / (1.0 + ratio) + 0.2 + cfg.aging_rate * max(0.0, now - t.submitted_at)


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


def plan_dynamic(tenants: Sequence[TenantState], cfg: PlannerConfig, now: float) -> ResourcePlan:
    """Re-divides memory and CPU among co-located tenants (see docs/scheduling.md):

    - memory: a running job wants its phase share of its request, never below its floor plus
      headroom, and ``peak * grow_by`` when its peak presses on its limit; pending jobs are
      admitted by score while their floor-plus-headroom fits; an urgent one that does not fit
      preempts the lowest-scored preemptible jobs; what is left is spread as headroom;
    - CPU: a busy service gets its share at once, training jobs split the rest in proportion to
      their requests.
    """
    shares = dict(cfg.phase_shares)
    plan = ResourcePlan()

    def floor_of(t: TenantState) -> int:
        return int(t.floor_memory * (1.0 + cfg.headroom))

    def want_of(t: TenantState) -> int:
        want = max(floor_of(t), int(shares.get(t.phase, 1.0) * t.request_memory))
        if t.running and t.limit:
            if t.peak > cfg.grow_when * t.limit:
                want = max(want, int(t.peak * cfg.grow_by))  # pressed: grow
            else:
                # Not below what it recently used with the same margin: lowering a limit the job
                # just grew into would flap (grow, lower, grow) and kill it at the low point.
                want = max(want, min(t.limit, int(t.peak * cfg.grow_by)))
        return want

    running = [t for t in tenants if t.running]
    want = {t.name: want_of(t) for t in running}
    n_train = sum(1 for t in running if t.kind == "training")
    pending = sorted((t for t in tenants if not t.running), key=lambda t: (-tenant_score(t, cfg, now), t.name))
    for t in pending:
        need = floor_of(t)
        committed = sum(floor_of(r) for r in running if r.name not in plan.preempt) + sum(
            floor_of(x) for x in tenants if x.name in plan.admit
        )
        if t.kind == "training" and n_train >= cfg.max_running and t.urgency < cfg.preempt_urgency:
            continue
        if committed + need > cfg.memory or (t.kind == "training" and n_train >= cfg.max_running):
            if t.urgency < cfg.preempt_urgency:
                continue
            score = tenant_score(t, cfg, now)
            victims = sorted(
                (
                    r
                    for r in running
                    if r.preemptible
                    and r.kind == "training"
                    and r.name not in plan.preempt
                    and tenant_score(r, cfg, now) + 0.05 < score
                ),
                key=lambda r: tenant_score(r, cfg, now),
            )
            chosen: list[TenantState] = []
            for v in victims:
                if committed - sum(floor_of(c) for c in chosen) + need <= cfg.memory and (
                    t.kind != "training" or n_train - len(chosen) < cfg.max_running
                ):
                    break
                chosen.append(v)
            freed = sum(floor_of(c) for c in chosen)
            if committed - freed + need > cfg.memory or (
                t.kind == "training" and n_train - len(chosen) >= cfg.max_running
            ):
                continue
            plan.preempt.extend(c.name for c in chosen)
            n_train -= len(chosen)
        plan.admit.append(t.name)
        want[t.name] = max(need, int(shares.get(t.phase, 1.0) * t.request_memory))
        n_train += t.kind == "training"
    live = [t for t in tenants if (t.running and t.name not in plan.preempt) or t.name in plan.admit]
    # Fit the wants into memory: cut what is above the floors proportionally, then spread the rest.
    floors = {t.name: floor_of(t) for t in live}
    total = sum(want[t.name] for t in live)
    if total > cfg.memory:
        above = sum(want[t.name] - floors[t.name] for t in live)
        room = max(0, cfg.memory - sum(floors.values()))
        for t in live:
            extra = want[t.name] - floors[t.name]
            want[t.name] = floors[t.name] + (int(extra * room / above) if above else 0)
    else:
        spare = cfg.memory - total
        for t in live:
            want[t.name] += int(spare * want[t.name] / total) if total else 0
    plan.memory = {t.name: want[t.name] for t in live}
    service = [t for t in live if t.kind == "service"]
    train = [t for t in live if t.kind == "training"]
    for s in service:
        plan.cpus[s.name] = cfg.service_cores_busy if s.busy else cfg.service_cores_idle
        # A quota only caps; on busy cores the weight is what lets urgent work run first.
        plan.cpu_weights[s.name] = 1000 if s.busy else 100
    left = max(0.0, cfg.cores - sum(plan.cpus.values()))
    asked = sum(t.request_cpus for t in train)
    for t in train:  # in proportion to the requests: idle cores go to whoever runs
        plan.cpus[t.name] = max(cfg.min_training_cores, left * t.request_cpus / asked if asked else left / len(train))
        plan.cpu_weights[t.name] = 100
    return plan
