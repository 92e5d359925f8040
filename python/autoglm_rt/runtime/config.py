"""The Runtime's small configuration objects (all optional; the defaults are what a user without
an opinion wants)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autoglm_rt.offload import EscalationConfig, OptimizerOffload

from autoglm_rt.resources import cpu_quota_cores


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching and accumulation. ``effective_batch``: samples per optimizer step (default:
    the first loader batch's size). ``micro_batch``: the starting micro-batch (default: the
    effective batch). ``goodput``: grow the effective batch up to ``max_effective_batch`` when the
    noise scale says it pays, with the LR scaled by ``lr_rule`` (see ``policy.batch``)."""

    effective_batch: int | None = None
    micro_batch: int | None = None
    min_micro_batch: int = 1
    goodput: bool = False
    max_effective_batch: int | None = None
    lr_rule: str = "adascale"

    def controller_kwargs(self) -> dict[str, Any]:
        return {
            "min_micro_batch": self.min_micro_batch,
            "goodput": self.goodput,
            "max_effective_batch": self.max_effective_batch,
            "lr_rule": self.lr_rule,
        }


@dataclass(frozen=True)
class MemoryConfig:
    """How the memory policy drives the Runtime's ``pool`` (or any memory signal with
    ``stats()``/``set_limit()``). ``capacity``: the device memory the phase fractions refer to
    (default: the pool's limit, else the device's or host's total memory). ``limits``: per-phase
    limits (fractions or sizes; default ``policy.memory.DEFAULT_LIMITS``). ``threads_by_phase``:
    per-phase thread counts; ``False`` leaves the thread count alone. ``offload``: opt in to the
    last step of the memory escalation (an ``autoglm_rt.offload.OptimizerOffload`` over the
    Runtime's optimizer, or a tier name, ``"disk"`` or ``"host"``; see ``runtime.offloading``),
    with the thresholds of ``escalation`` (an ``autoglm_rt.offload.EscalationConfig``)."""

    capacity: int | str | None = None
    limits: Mapping[str, float | int | str] | None = None
    threads_by_phase: Mapping[str, int] | bool | None = None
    offload: OptimizerOffload | str | None = None
    escalation: EscalationConfig | None = None


@dataclass(frozen=True)
class ThreadConfig:
    """Holds the step time at ``step_time_target`` seconds with as few CPU threads as it takes
    (1..``max_threads``, default: the cores this process may use), applied by ``setter`` (default:
    ``torch.set_num_threads`` and the native pool), leaving the other cores to other tenants. It
    then owns the thread count (the phase's thread setting is skipped)."""

    step_time_target: float
    max_threads: int | None = None
    setter: Callable[[int], None] | None = None


@dataclass(frozen=True)
class Hooks:
    """Callables the Runtime calls. ``metrics_source``: monitor figures for the strategy
    (``gpu_utilization``, ``memory_usage``, ``cpu_usage``, ``load_1min`` ...). ``metrics_sink``:
    called with every ``StepReport``. ``alert``: called with every ``alert`` action. ``clock``:
    seconds (monotonic). ``cpu_quota``: the CPU quota in cores that holds for this process (None:
    none), re-read about once a second; the Runtime's thread counts stay within ``cores_cap`` of it
    (see ``runtime.cpu_quota``). Default: this process's cgroup; None turns that off."""

    metrics_source: Callable[[], Mapping[str, Any]] | None = None
    metrics_sink: Callable[[Any], None] | None = None
    alert: Callable[[Any], None] | None = None
    clock: Callable[[], float] = time.perf_counter
    cpu_quota: Callable[[], float | None] | None = cpu_quota_cores


__all__ = ["BatchConfig", "Hooks", "MemoryConfig", "ThreadConfig"]
