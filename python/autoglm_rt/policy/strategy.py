"""Strategies: YAML rules that turn metrics into actions, with Prometheus-style ``for:``, hysteresis
(``clear:``) and a ``cooldown:``.

The mission's document loads as written::

    strategy:
      name: dynamic-balance
      trigger:
        gpu_utilization: ">80%"
        memory_usage: ">75%"
      actions:
        - scale_up_replicas: 2
        - migrate_task: true
        - adjust_gpu_memory_limit: "12Gi"

A file holds either ``strategy:`` (one rule) or ``strategies:`` (a list of them). A rule's keys:
``name``, ``trigger`` (every condition must hold; an ``any:`` list of condition groups of which one
must hold), ``actions`` (a list of one-key mappings), and optionally ``for`` (how long the trigger
must hold before it fires), ``clear`` (conditions that end a firing episode; without it the episode
ends when the trigger stops holding), ``cooldown`` (the least time between two firings) and
``description``. Conditions are strings such as ``">80%"``, ``">= 0.8"``, ``"<250ms"``,
``">10Gi"``; ratio metrics are 0..1 (``"80%"`` is 0.8); ``phase`` takes a phase name, ``"!=name"``
or a list of names. A rule fires once per episode (edge-triggered): its actions are emitted when
it enters the firing state, not on every evaluation.

Anything malformed (bad YAML, unknown metric or action, bad threshold, wrong type, duplicate key)
raises :class:`ConfigError`, which names the file, the line and the field.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from autoglm_rt.constants import PHASES, PRECISIONS
from autoglm_rt.memory import STATS_KEYS as POOL_STATS
from autoglm_rt.units import parse_size


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
    "offload_optimizer_state": ("bool", "offload"),
    "set_precision": ("precision", "precision"),
    "alert": ("text", "alert"),
}

_RULE_KEYS = ("name", "description", "trigger", "for", "clear", "cooldown", "actions")
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_COND_RE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(\S.*?)\s*$")
_DURATION_RE = re.compile(r"^\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """A malformed strategy document. ``source`` (file path or ``"<string>"``), ``line`` (1-based,
    or None when unknown) and ``field`` (a dotted path such as ``strategy.trigger.memory_usage``)
    say where; the message says what was expected."""

    def __init__(self, message: str, *, source: str, line: int | None, field: str) -> None:
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {field}: {message}")
        self.source = source
        self.line = line
        self.field = field
        self.reason = message


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
            return (value in self.threshold) if self.op == "in" else _OPS[self.op](value, self.threshold)
        if kind == "bool":
            return _OPS[self.op](bool(value), self.threshold)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metrics[{self.metric!r}]: expected a number, got {type(value).__name__}") from None
        if math.isnan(value):
            return False
        return _OPS[self.op](value, self.threshold)

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


@dataclass
class _RuleState:
    state: str = "inactive"  # inactive | pending | firing
    pending_since: float = 0.0
    last_fired: float | None = None


class Strategy:
    """The rules of one strategy file and their evaluation state. Not thread-safe: evaluate from
    one thread (the training loop)."""

    def __init__(self, rules: list[Rule], *, source: str = "<string>") -> None:
        if not rules:
            raise ValueError("rules: expected at least one rule")
        self.rules = tuple(rules)
        self.source = source
        self._states = {r.name: _RuleState() for r in self.rules}
        self._last_now: float | None = None

    @classmethod
    def from_yaml(cls, text_or_path: str | bytes | os.PathLike[str]) -> Strategy:
        """Parses a strategy document given as YAML text or a path (a ``PathLike``, or a one-line
        string that names an existing file or ends in ``.yaml``/``.yml``). Raises ConfigError
        naming the file, line and field for anything malformed; FileNotFoundError for a path that
        does not exist."""
        source = "<string>"
        if isinstance(text_or_path, os.PathLike) or (
            isinstance(text_or_path, str)
            and "\n" not in text_or_path
            and (text_or_path.endswith((".yaml", ".yml")) or os.path.isfile(text_or_path))
        ):
            path = Path(text_or_path)
            source = str(path)
            raw: str | bytes = path.read_bytes()
        elif isinstance(text_or_path, (str, bytes)):
            raw = text_or_path
        else:
            raise TypeError(f"text_or_path: expected YAML text or a path, got {type(text_or_path).__name__}")
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"not UTF-8 text ({exc.reason})", source=source, line=None, field="<document>"
                ) from None
        return cls(_Parser(raw, source).parse(), source=source)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def state(self, name: str) -> str:
        """``inactive``, ``pending`` (trigger holds, waiting for ``for``/``cooldown``) or ``firing``."""
        return self._states[name].state

    def reset(self) -> None:
        """Forgets every rule's state (as if no metric had been seen)."""
        self._states = {r.name: _RuleState() for r in self.rules}
        self._last_now = None

    def evaluate(self, metrics: Mapping[str, Any], now: float) -> list[Action]:
        """Feeds one observation of the metrics at time ``now`` (seconds, non-decreasing) and returns
        the actions of every rule that starts firing now, in file order. Metrics a rule does not
        read are ignored; a missing or NaN metric never satisfies a condition."""
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise ValueError(f"now: expected a finite time in seconds, got {now!r}")
        if self._last_now is not None and now < self._last_now:
            raise ValueError(f"now: time went backwards ({now} < {self._last_now})")
        self._last_now = now
        actions: list[Action] = []
        for rule in self.rules:
            st = self._states[rule.name]
            holds = rule.trigger.holds(metrics)
            if st.state == "firing":
                ended = rule.clear.holds(metrics) if rule.clear is not None else not holds
                if not ended:
                    continue
                st.state = "inactive"
            if st.state == "inactive" and holds:
                st.state, st.pending_since = "pending", now
            if st.state == "pending":
                if not holds:
                    st.state = "inactive"
                    continue
                cooled = st.last_fired is None or now - st.last_fired >= rule.cooldown_seconds
                if now - st.pending_since >= rule.for_seconds and cooled:
                    st.state, st.last_fired = "firing", now
                    evidence = {m: metrics.get(m) for m in rule.trigger.metrics()}
                    actions.extend(
                        Action(a.name, a.value, rule.name, now, evidence) for a in rule.actions if a.value is not False
                    )
        return actions


class _Parser:
    """Walks the composed YAML node tree so every error can name its line."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.loader: yaml.SafeLoader | None = None

    def error(self, message: str, node: yaml.Node | None, fld: str) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None and node.start_mark is not None else None
        return ConfigError(message, source=self.source, line=line, field=fld)

    def parse(self) -> list[Rule]:
        try:
            self.loader = yaml.SafeLoader(self.text)
            try:
                root = self.loader.get_single_node()
            finally:
                self.loader.dispose()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = exc.problem or exc.context or "invalid YAML"
            raise ConfigError(f"invalid YAML: {problem}", source=self.source, line=line, field="<document>") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"invalid YAML: {exc}", source=self.source, line=None, field="<document>") from None
        except RecursionError:
            raise ConfigError("nested too deeply", source=self.source, line=None, field="<document>") from None
        if root is None:
            raise ConfigError(
                "empty document; expected a mapping with 'strategy' or 'strategies'",
                source=self.source,
                line=None,
                field="<document>",
            )
        top = self.mapping(root, "<document>")
        keys = set(top) - {"strategy", "strategies"}
        if keys:
            key = sorted(keys)[0]
            raise self.error(f"unknown key {key!r}; expected 'strategy' or 'strategies'", top[key][0], key)
        if len(top) != 1:
            raise self.error("expected exactly one of 'strategy' or 'strategies'", root, "<document>")
        if "strategy" in top:
            rules = [self.rule(top["strategy"][1], "strategy", 0)]
        else:
            seq_node = top["strategies"][1]
            if not isinstance(seq_node, yaml.SequenceNode) or not seq_node.value:
                raise self.error("expected a non-empty list of strategies", seq_node, "strategies")
            rules = [self.rule(n, f"strategies[{i}]", i) for i, n in enumerate(seq_node.value)]
        seen: dict[str, str] = {}
        for rule, fld in zip(rules, [f"strategies[{i}]" for i in range(len(rules))], strict=True):
            if rule.name in seen:
                raise ConfigError(
                    f"duplicate strategy name {rule.name!r} (also {seen[rule.name]})",
                    source=self.source,
                    line=rule.line,
                    field=f"{fld}.name",
                )
            seen[rule.name] = fld
        return rules

    def mapping(self, node: yaml.Node, fld: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping node's entries by key (string keys only, no duplicates)."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {_describe(node)}", node, fld)
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node, fld)
            if not isinstance(key, str):
                raise self.error(f"expected a string key, got {key!r}", key_node, fld)
            if key in out:
                raise self.error(f"duplicate key {key!r}", key_node, f"{fld}.{key}" if fld != "<document>" else key)
            out[key] = (key_node, value_node)
        return out

    def scalar(self, node: yaml.Node, fld: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got {_describe(node)}", node, fld)
        assert self.loader is not None
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            raise self.error(f"cannot read value {node.value!r} ({exc.__class__.__name__})", node, fld) from None

    def rule(self, node: yaml.Node, fld: str, index: int) -> Rule:
        entries = self.mapping(node, fld)
        for key, (key_node, _) in entries.items():
            if key not in _RULE_KEYS:
                raise self.error(
                    f"unknown key {key!r}; expected one of {', '.join(_RULE_KEYS)}", key_node, f"{fld}.{key}"
                )
        for required in ("trigger", "actions"):
            if required not in entries:
                raise self.error(f"missing required key {required!r}", node, f"{fld}.{required}")
        name = f"strategy-{index}"
        if "name" in entries:
            name = self.scalar(entries["name"][1], f"{fld}.name")
            if not isinstance(name, str) or not name.strip():
                raise self.error(f"expected a non-empty string, got {name!r}", entries["name"][1], f"{fld}.name")
        description = ""
        if "description" in entries:
            description = self.scalar(entries["description"][1], f"{fld}.description")
            if not isinstance(description, str):
                raise self.error("expected a string", entries["description"][1], f"{fld}.description")
        trigger = self.trigger(entries["trigger"][1], f"{fld}.trigger")
        clear = self.trigger(entries["clear"][1], f"{fld}.clear") if "clear" in entries else None
        for_s = self.duration(entries["for"][1], f"{fld}.for") if "for" in entries else 0.0
        cooldown = self.duration(entries["cooldown"][1], f"{fld}.cooldown") if "cooldown" in entries else 0.0
        actions = self.actions(entries["actions"][1], f"{fld}.actions")
        return Rule(
            name=name,
            trigger=trigger,
            actions=actions,
            for_seconds=for_s,
            clear=clear,
            cooldown_seconds=cooldown,
            description=description,
            line=node.start_mark.line + 1,
        )

    def trigger(self, node: yaml.Node, fld: str) -> Trigger:
        entries = self.mapping(node, fld)
        if not entries:
            raise self.error("expected at least one condition", node, fld)
        conditions: list[Condition] = []
        groups: list[Trigger] = []
        for key, (key_node, value_node) in entries.items():
            if key == "any":
                if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                    raise self.error("expected a non-empty list of condition groups", value_node, f"{fld}.any")
                groups.extend(self.trigger(n, f"{fld}.any[{i}]") for i, n in enumerate(value_node.value))
            elif key in METRICS:
                conditions.append(self.condition(key, value_node, f"{fld}.{key}"))
            else:
                raise self.error(
                    f"unknown metric {key!r}; expected one of {', '.join(sorted(METRICS))} or 'any'",
                    key_node,
                    f"{fld}.{key}",
                )
        return Trigger(tuple(conditions), tuple(groups))

    def condition(self, metric: str, node: yaml.Node, fld: str) -> Condition:
        kind = METRICS[metric]
        line = node.start_mark.line + 1
        if kind == "phase":
            if isinstance(node, yaml.SequenceNode):
                names = [self.scalar(n, fld) for n in node.value]
                if not names:
                    raise self.error("expected a non-empty list of phases", node, fld)
                for n in names:
                    if n not in PHASES:
                        raise self.error(f"unknown phase {n!r}; expected one of {', '.join(PHASES)}", node, fld)
                return Condition(metric, "in", tuple(names), line)
            value = self.scalar(node, fld)
            if not isinstance(value, str):
                raise self.error(f"expected a phase name, got {value!r}", node, fld)
            m = _COND_RE.match(value)
            op, name = (m.group(1), m.group(2)) if m else ("==", value.strip())
            if op not in ("==", "!=") or name not in PHASES:
                raise self.error(
                    f"expected a phase ({', '.join(PHASES)}), '!=phase' or a list, got {value!r}", node, fld
                )
            return Condition(metric, op, name, line)
        value = self.scalar(node, fld)
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.error(f"expected true or false, got {value!r}", node, fld)
            return Condition(metric, "==", value, line)
        if not isinstance(value, str):
            raise self.error(f"expected a comparison string such as {_example(kind)}, got {value!r}", node, fld)
        m = _COND_RE.match(value)
        if not m:
            raise self.error(f"expected a comparison such as {_example(kind)}, got {value!r}", node, fld)
        op, text = m.group(1), m.group(2)
        threshold = self.threshold(kind, text, node, fld)
        return Condition(metric, op, threshold, line)

    def threshold(self, kind: str, text: str, node: yaml.Node, fld: str) -> float:
        bad = f"bad threshold {text!r}; expected {_example(kind)}"
        if kind == "ratio":
            pct = text.endswith("%")
            number = _finite_float(text[:-1] if pct else text)
            if number is None:
                raise self.error(bad, node, fld)
            ratio = number / 100 if pct else number
            if not 0.0 <= ratio <= 1.0:
                raise self.error(f"ratio {text!r} outside 0..1 (0%..100%)", node, fld)
            return ratio
        if kind == "seconds":
            seconds = _duration(text)
            if seconds is None:
                raise self.error(bad, node, fld)
            return seconds
        if kind == "bytes":
            try:
                return float(parse_size(text, name=fld))
            except (TypeError, ValueError):
                raise self.error(bad, node, fld) from None
        number = _finite_float(text)
        if number is None or (kind == "count" and number < 0):
            raise self.error(bad, node, fld)
        return number

    def duration(self, node: yaml.Node, fld: str) -> float:
        value = self.scalar(node, fld)
        seconds: float | None
        if isinstance(value, bool):
            seconds = None
        elif isinstance(value, (int, float)):
            seconds = float(value) if math.isfinite(value) and value >= 0 else None
        elif isinstance(value, str):
            seconds = _duration(value)
        else:
            seconds = None
        if seconds is None:
            raise self.error(
                f"expected a duration such as 30s, 250ms, 5m or a number of seconds, got {value!r}", node, fld
            )
        return seconds

    def actions(self, node: yaml.Node, fld: str) -> tuple[ActionSpec, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(f"expected a non-empty list of actions, got {_describe(node)}", node, fld)
        specs = []
        for i, item in enumerate(node.value):
            entries = self.mapping(item, f"{fld}[{i}]")
            if len(entries) != 1:
                raise self.error(
                    "expected exactly one action per list item (e.g. '- migrate_task: true')", item, f"{fld}[{i}]"
                )
            ((name, (key_node, value_node)),) = entries.items()
            item_fld = f"{fld}[{i}].{name}"
            if name not in ACTIONS:
                raise self.error(f"unknown action {name!r}; expected one of {', '.join(ACTIONS)}", key_node, item_fld)
            specs.append(ActionSpec(name, self.action_value(name, value_node, item_fld), item.start_mark.line + 1))
        return tuple(specs)

    def action_value(self, name: str, node: yaml.Node, fld: str) -> Any:
        kind = ACTIONS[name][0]
        value = self.scalar(node, fld)
        if kind == "positive_int":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise self.error(f"expected a positive integer, got {value!r}", node, fld)
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise self.error(f"expected true or false, got {value!r}", node, fld)
            return value
        if kind == "size_or_ratio":
            if isinstance(value, str) and value.strip().endswith("%"):
                number = _finite_float(value.strip()[:-1])
                if number is None or not 0 < number <= 100:
                    raise self.error(f"expected a percentage in (0%, 100%], got {value!r}", node, fld)
                return ("ratio", number / 100)
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise self.error(
                    f"expected a size such as '12Gi' or a percentage such as '60%', got {value!r}", node, fld
                )
            try:
                size = parse_size(value, name=fld)
            except (TypeError, ValueError) as exc:
                raise self.error(str(exc), node, fld) from None
            if size <= 0:
                raise self.error(f"expected a positive size, got {value!r}", node, fld)
            return size
        if kind == "precision":
            if value not in PRECISIONS:
                raise self.error(f"expected one of {', '.join(PRECISIONS)}, got {value!r}", node, fld)
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(f"expected a non-empty message, got {value!r}", node, fld)
        return value


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"


def _example(kind: str) -> str:
    return {
        "ratio": "'>80%' or '>= 0.8'",
        "seconds": "'>250ms' or '<2s'",
        "bytes": "'>10Gi'",
        "count": "'>0'",
        "number": "'>4' or '<= 1.5'",
    }.get(kind, "'>1'")


def _finite_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _duration(text: str) -> float | None:
    m = _DURATION_RE.match(text)
    if not m:
        return None
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    return seconds if math.isfinite(seconds) else None
