"""What the priority scheduler works on: tasks, devices, task states and the plan it returns.

Plain frozen dataclasses that check their fields when made (a bad field raises ``TypeError`` or
``ValueError`` naming the task and the field), plus :class:`TaskRecord`, the scheduler's
bookkeeping of one submitted task.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from autoglm_rt.units import parse_size

__all__ = ["Device", "Placement", "Plan", "Preemption", "SchedulerError", "Task", "TaskRecord", "TaskState"]


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
class TaskRecord:
    """The scheduler's bookkeeping of one submitted task (mutable; owned by the scheduler)."""

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
