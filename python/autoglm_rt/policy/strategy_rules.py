"""What a strategy is made of: the metrics a trigger may read, the actions it may take, and the
rules themselves (conditions, triggers, action specs), with how a condition is evaluated.
The YAML format is parsed by ``policy.strategy_file``; rules are evaluated over time by
``policy.strategy.Strategy``."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from autoglm_rt.memory import STATS_KEYS as POOL_STATS


def _metric_kinds() -> dict[str, str]:
    kinds = {
        "gpu_utilization": "ratio",
        "memory_usage": "ratio",
        "gpu_memory_usage": "ratio",
        "host_memory_usage": "ratio",
        "cpu_usage": "ratio",
        "load_1min": "number",
        "step_time": "seconds",
        "phase": "phase",
        "unstable": "bool",
        "noise_scale": "number",
    }
    for key in POOL_STATS:
        kinds[f"pool.{key}"] = "bytes" if key.endswith("_bytes") else "ratio" if key.endswith("_ratio") else "count"
    return kinds


#: Every metric a trigger may name, with its kind: ``ratio`` (0..1), ``number``, ``count`` (>= 0),
#: ``seconds``, ``bytes``, ``phase`` (a phase name) or ``bool``.
METRICS: dict[str, str] = _metric_kinds()

#: Every action a strategy may take: the kind of value it takes and the actuator it goes to.
ACTIONS: dict[str, tuple[str, str]] = {
    "scale_up_replicas": ("positive_int", "scheduler"),
    "scale_down_replicas": ("positive_int", "scheduler"),
    "migrate_task": ("bool", "scheduler"),
    "adjust_gpu_memory_limit": ("size_or_ratio", "pool"),
    "trim_pool": ("bool", "pool"),
    "adjust_cpu_threads": ("positive_int", "threads"),
    "shrink_micro_batch": ("bool", "batch"),
    "grow_micro_batch": ("bool", "batch"),
    "set_precision": ("precision", "precision"),
    "alert": ("text", "alert"),
}

OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Condition:
    """``metric <op> threshold`` (for ``phase`` with a list: membership). Holds only when the
    metric is present and comparable; a missing or NaN metric never satisfies a condition."""

    metric: str
    op: str
    threshold: Any
    line: int | None = None

    def holds(self, metrics: Mapping[str, Any]) -> bool:
        if self.metric not in metrics:
            return False
        value = metrics[self.metric]
        if value is None:
            return False
        kind = METRICS[self.metric]
        if kind == "phase":
            if not isinstance(value, str):
                raise TypeError(f"metrics[{self.metric!r}]: expected a phase name, got {type(value).__name__}")
            return (value in self.threshold) if self.op == "in" else OPS[self.op](value, self.threshold)
        if kind == "bool":
            return OPS[self.op](bool(value), self.threshold)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metrics[{self.metric!r}]: expected a number, got {type(value).__name__}") from None
        if math.isnan(value):
            return False
        return OPS[self.op](value, self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold}"


@dataclass(frozen=True)
class Trigger:
    """All ``conditions`` hold and, when ``any_of`` is not empty, at least one of its groups holds."""

    conditions: tuple[Condition, ...]
    any_of: tuple[Trigger, ...] = ()

    def holds(self, metrics: Mapping[str, Any]) -> bool:
        if not all(c.holds(metrics) for c in self.conditions):
            return False
        return not self.any_of or any(group.holds(metrics) for group in self.any_of)

    def metrics(self) -> Iterator[str]:
        """Every metric this trigger reads."""
        for c in self.conditions:
            yield c.metric
        for group in self.any_of:
            yield from group.metrics()


@dataclass(frozen=True)
class ActionSpec:
    """One action of a rule as written: ``name`` (a key of :data:`ACTIONS`) and its parsed value
    (an int, a bool, a byte count, a ``("ratio", x)`` pair for percent limits, or a string)."""

    name: str
    value: Any
    line: int | None = None

    @property
    def target(self) -> str:
        return ACTIONS[self.name][1]


@dataclass(frozen=True)
class Action:
    """An action a strategy decided to take: what, with which value, which rule, when, and the
    metric values that made the trigger hold (``evidence``)."""

    name: str
    value: Any
    strategy: str
    time: float
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """The actuator that carries it out: scheduler, pool, threads, batch, precision or alert."""
        return ACTIONS[self.name][1]


@dataclass(frozen=True)
class Rule:
    """One strategy of a file (see the module docstring)."""

    name: str
    trigger: Trigger
    actions: tuple[ActionSpec, ...]
    for_seconds: float = 0.0
    clear: Trigger | None = None
    cooldown_seconds: float = 0.0
    description: str = ""
    line: int | None = None


__all__ = ["ACTIONS", "METRICS", "OPS", "Action", "ActionSpec", "Condition", "Rule", "Trigger"]
