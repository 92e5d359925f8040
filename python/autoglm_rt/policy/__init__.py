"""The policy layer: plain Python over numbers that turns statistics and load into decisions.

- :class:`PhaseDetector` (``phase``): initial / convergence / fine-tuning plus an unstable flag.
- :class:`MemoryPolicy` (``memory``): phase -> pool memory limit and CPU threads.
- :class:`BatchController` (``batch``): micro-batch size and accumulation steps; goodput sizing
  and LR scaling rules in ``goodput``.
- :class:`PID` (``control``): holds a measured quantity at a target.
- :class:`Strategy` (``strategy``): YAML rules -> actions; :class:`ConfigError` for bad documents.
- :class:`PriorityScheduler` (``scheduler``): tasks by score with aging, gang admission,
  preemption with minimal victims.
- :class:`Actuators` (``actuators``): where actions go (pool, batch, threads, precision, scheduler,
  alert).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from autoglm_rt.policy.actuators import ActionResult, Actuators, scheduler_from_environment
from autoglm_rt.policy.batch import BatchController, BatchPlan
from autoglm_rt.policy.control import PID
from autoglm_rt.policy.goodput import lr_factor, statistical_efficiency
from autoglm_rt.policy.memory import MemoryDecision, MemoryPolicy
from autoglm_rt.policy.oom import is_out_of_memory, run_step
from autoglm_rt.policy.phase import PhaseDetector, PhaseEvent, PhaseState
from autoglm_rt.policy.scheduler import Device, PriorityScheduler, SchedulerError, Task, TaskState
from autoglm_rt.policy.simulate import read_metrics_csv, simulate
from autoglm_rt.policy.strategy import Strategy
from autoglm_rt.policy.strategy_file import ConfigError
from autoglm_rt.policy.strategy_rules import Action, Rule


def bundled_strategy(name: str) -> Path:
    """Path of a strategy file shipped with the package (``policy/strategies/NAME.yaml``): ``"demo"``
    (the demo's: a phase change halves the micro-batch), ``"dynamic_balance"``, ``"phase_aware"``.
    Raises ValueError naming the available ones for any other name."""
    path = Path(str(resources.files("autoglm_rt.policy") / "strategies" / f"{name}.yaml"))
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"name: no bundled strategy {name!r}; available: {', '.join(available)}")
    return path


__all__ = [
    "PID",
    "Action",
    "ActionResult",
    "Actuators",
    "BatchController",
    "BatchPlan",
    "ConfigError",
    "Device",
    "MemoryDecision",
    "MemoryPolicy",
    "PhaseDetector",
    "PhaseEvent",
    "PhaseState",
    "PriorityScheduler",
    "Rule",
    "SchedulerError",
    "Strategy",
    "Task",
    "TaskState",
    "bundled_strategy",
    "is_out_of_memory",
    "lr_factor",
    "read_metrics_csv",
    "run_step",
    "scheduler_from_environment",
    "simulate",
    "statistical_efficiency",
]
