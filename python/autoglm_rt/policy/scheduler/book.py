"""The priority scheduler's ledger: which tasks exist, their states, devices, ages and
checkpoints, and the transitions a caller reports (submitted, adopted, finished, stopped).

:class:`TaskBook` decides nothing; :class:`~autoglm_rt.policy.scheduler.priority.PriorityScheduler`
extends it with the scores and the decision. Not thread-safe: call it from one thread.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence

from autoglm_rt.policy.scheduler.tasks import Device, SchedulerError, Task, TaskRecord, TaskState

__all__ = ["TaskBook"]


class TaskBook:
    """Tasks and their devices on one machine. ``devices``: a count (devices 0..n-1, memory
    unbounded) or a sequence of :class:`Device` / indices. ``cpus``: CPUs to share (``math.inf`` if
    not limited). ``clock``: seconds, monotonic; every method also takes an explicit ``now``."""

    def __init__(
        self,
        devices: int | Sequence[Device | int],
        *,
        cpus: float = math.inf,
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
        if not (isinstance(cpus, int | float) and cpus >= 0) or cpus != cpus:
            raise ValueError(f"cpus: expected a number >= 0 or math.inf, got {cpus!r}")
        self.cpus = float(cpus)
        self._clock = clock
        self._entries: dict[str, TaskRecord] = {}
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
        self._entries[task.name] = TaskRecord(task, next(self._order), submitted_at=since)

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

    # ---------------------------------------------------------------- internals

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def _get(self, name: str) -> TaskRecord:
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

    def _start(self, e: TaskRecord, devices: tuple[int, ...], now: float) -> None:
        e.state, e.devices, e.started_at = TaskState.RUNNING, devices, now
        e.starts += 1

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
