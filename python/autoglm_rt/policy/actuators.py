"""Where a strategy's actions go, and what each one did.

Targets: ``pool`` (memory limit through :class:`~autoglm_rt.policy.memory.MemoryPolicy`, trim),
``batch`` (:class:`~autoglm_rt.policy.batch.BatchController` shrink/grow), ``threads``,
``precision`` (autocast dtype), ``scheduler`` (task migration and replica scaling) and ``alert``.

An action is reported ``applied=True`` only when something carried it out; otherwise the result
says ``applied=False`` and why (no scheduler attached, a pool that holds none of the job's memory,
a bound already reached...). :func:`scheduler_from_environment` finds the queue a job runs under
(``autoglm-rt queue`` sets ``AUTOGLM_RT_QUEUE_STATE`` and ``AUTOGLM_RT_JOB_NAME``), so a job's
migrate requests reach the real runner by default.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.memory import MemoryPolicy
from autoglm_rt.policy.strategy_rules import Action

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


def scheduler_from_environment(env: Mapping[str, str]) -> Scheduler | None:
    """The scheduler of the job this process runs under, from the environment its launcher set:
    an ``autoglm_rt.elastic.ElasticJob`` (``AUTOGLM_RT_ELASTIC_ENDPOINT``, ``..._RUN_ID``) or an
    ``autoglm-rt queue`` (``AUTOGLM_RT_QUEUE_STATE``, ``AUTOGLM_RT_JOB_NAME``); None otherwise.
    (The jobs layer is imported only then: it sits above the policy layer.)"""
    endpoint, run_id = env.get("AUTOGLM_RT_ELASTIC_ENDPOINT"), env.get("AUTOGLM_RT_ELASTIC_RUN_ID")
    if endpoint and run_id:
        from autoglm_rt.elastic import ElasticJobScheduler

        return ElasticJobScheduler(endpoint, run_id, rank=int(env.get("RANK", "0") or 0))
    state, job = env.get("AUTOGLM_RT_QUEUE_STATE"), env.get("AUTOGLM_RT_JOB_NAME")
    if state and job:
        from autoglm_rt.jobqueue.job_side import QueueJobScheduler

        return QueueJobScheduler(state, job)
    return None


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
    ) -> None:
        self.memory = memory
        self.batch = batch
        self.threads = threads
        self.precision = precision
        self.scheduler = scheduler
        self.alert = alert
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
        if name in ("scale_up_replicas", "scale_down_replicas", "migrate_task"):
            if self.scheduler is None:
                return False, "not carried out: no scheduler attached (run under autoglm-rt queue or pass scheduler=)"
            if name == "migrate_task":
                return _answer(self.scheduler.migrate(action))
            delta = int(value) if name == "scale_up_replicas" else -int(value)
            return _answer(self.scheduler.scale_replicas(delta, action))
        if name == "adjust_gpu_memory_limit":
            if self.memory is None:
                return False, "not carried out: no pool attached"
            if not _holds_memory(self.memory.pool):
                return False, (
                    "not carried out: the pool holds none of this job's memory "
                    "(on CPU torch's tensors live outside it; give a cgroup memory signal as pool=)"
                )
            limit = self.memory.set_limit(value)
            return True, f"memory limit set to {limit} bytes"
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
        if name == "alert":
            if self.alert is not None:
                self.alert(action)
            log.warning("alert from %s: %s", action.strategy, value)
            return True, f"alert: {value}"
        return False, f"unknown action {name!r}"


def _answer(detail: str) -> tuple[bool, str]:
    """A scheduler's answer: carried out unless it starts with "not " (its convention)."""
    return not detail.startswith("not "), detail


def _holds_memory(pool: Any) -> bool:
    """Whether anything was ever allocated through ``pool`` (a limit on an empty pool limits
    nothing). Memory signals without allocation counters are taken to hold the job's memory."""
    stats = pool.stats()
    if "num_allocs" not in stats and "peak_allocated_bytes" not in stats:
        return True
    return bool(stats.get("num_allocs", 0) or stats.get("peak_allocated_bytes", 0) or stats.get("allocated_bytes", 0))
