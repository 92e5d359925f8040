"""Where a strategy's actions go, and what each one did.

Targets: ``pool`` (memory limit through :class:`~autoglm_rt.policy.memory.MemoryPolicy`, trim),
``batch`` (:class:`~autoglm_rt.policy.batch.BatchController` shrink/grow), ``threads``,
``precision`` (autocast dtype),
``offload`` (optimizer state to a slower tier), ``scheduler`` (task migration and replica scaling) and ``alert``.

The scheduler that really migrates tasks and scales replicas is a later issue; until it exists,
:class:`RecordingScheduler` records what was asked, so a run's report shows every scheduling
decision instead of dropping it. An action whose target has no actuator is recorded as not
applied, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.memory import MemoryPolicy
from autoglm_rt.policy.strategy import Action

log = logging.getLogger("autoglm_rt.policy")


class Scheduler(Protocol):
    """What the actuators need of a scheduler (the later scheduler issue provides a real one)."""

    def scale_replicas(self, delta: int, action: Action) -> str: ...

    def migrate(self, action: Action) -> str: ...


@dataclass(frozen=True)
class ActionResult:
    """An action, whether an actuator applied it, and what happened."""

    action: Action
    applied: bool
    detail: str


class RecordingScheduler:
    """Records scale and migrate requests (``requests``: ``(time, kind, value, strategy)``) without
    acting on them: a stand-in until the scheduler issue lands."""

    def __init__(self) -> None:
        self.requests: list[tuple[float, str, int, str]] = []

    def scale_replicas(self, delta: int, action: Action) -> str:
        self.requests.append((action.time, "scale", delta, action.strategy))
        return f"recorded: scale replicas by {delta:+d} (no scheduler attached)"

    def migrate(self, action: Action) -> str:
        self.requests.append((action.time, "migrate", 1, action.strategy))
        return "recorded: migrate task (no scheduler attached)"


class Actuators:
    """Dispatches actions to whatever was given; ``history`` holds every :class:`ActionResult`."""

    def __init__(
        self,
        *,
        memory: MemoryPolicy | None = None,
        batch: BatchController | None = None,
        threads: Callable[[int], None] | None = None,
        precision: Callable[[str], None] | None = None,
        scheduler: Scheduler | None = None,
        alert: Callable[[Action], None] | None = None,
        offload: Callable[[bool], bool] | None = None,
    ) -> None:
        self.memory = memory
        self.batch = batch
        self.threads = threads
        self.precision = precision
        self.scheduler = scheduler if scheduler is not None else RecordingScheduler()
        self.alert = alert
        self.offload = offload  # OptimizerOffload.set_offloaded: True when state moved
        self.history: list[ActionResult] = []

    def dispatch(self, action: Action) -> ActionResult:
        """Carries out one action; never raises for a missing actuator (the result says so)."""
        applied, detail = self._apply(action)
        result = ActionResult(action, applied, detail)
        self.history.append(result)
        log.info("action %s=%r from %s: %s", action.name, action.value, action.strategy, detail)
        return result

    def _apply(self, action: Action) -> tuple[bool, str]:
        name, value = action.name, action.value
        if name in ("scale_up_replicas", "scale_down_replicas"):
            delta = int(value) if name == "scale_up_replicas" else -int(value)
            return True, self.scheduler.scale_replicas(delta, action)
        if name == "migrate_task":
            return True, self.scheduler.migrate(action)
        if name == "adjust_gpu_memory_limit":
            if self.memory is None:
                return False, "no pool attached"
            limit = self.memory.set_limit(value)
            return True, f"pool limit set to {limit} bytes"
        if name == "trim_pool":
            trim: Any = getattr(self.memory.pool, "trim", None) if self.memory is not None else None
            if trim is None:
                return False, "no pool with trim() attached"
            return True, f"trimmed {trim()} bytes"
        if name in ("shrink_micro_batch", "grow_micro_batch"):
            if self.batch is None:
                return False, "no batch controller attached"
            change = (
                self.batch.shrink("strategy", action.strategy)
                if name == "shrink_micro_batch"
                else self.batch.grow("strategy", action.strategy)
            )
            if change is None:
                return False, f"micro-batch already at its bound ({self.batch.micro_batch})"
            return True, f"micro-batch {change.before.micro_batch} -> {change.after.micro_batch}"
        if name == "adjust_cpu_threads":
            if self.threads is None:
                return False, "no thread setter attached"
            self.threads(int(value))
            return True, f"threads set to {value}"
        if name == "set_precision":
            if self.precision is None:
                return False, "no precision setter attached"
            self.precision(str(value))
            return True, f"precision set to {value}"
        if name == "offload_optimizer_state":
            if self.offload is None:
                return False, "no optimizer offload attached"
            on = bool(value)
            if not self.offload(on):
                return False, f"optimizer state already {'offloaded' if on else 'resident'}"
            return True, "optimizer state offloaded" if on else "optimizer state restored"
        if name == "alert":
            if self.alert is not None:
                self.alert(action)
            log.warning("alert from %s: %s", action.strategy, value)
            return True, f"alert: {value}"
        return False, f"unknown action {name!r}"
