"""Strategy files: the YAML format of ``policy.strategy`` parsed into rules, as untrusted input.

Anything malformed (bad YAML, unknown key, metric or action, wrong type, duplicate key or name)
raises :class:`ConfigError`, which names the file, the line and the field; so does a value its
field does not accept, which ``policy.strategy_values`` checks (thresholds, durations, action
values within what their actuators accept). The YAML itself is composed by
``autoglm_rt.untrusted_yaml`` (bounded alias expansion, depth and size: no "alias bomb").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from autoglm_rt.policy import strategy_values as values
from autoglm_rt.policy.strategy_rules import ACTIONS, METRICS, ActionSpec, Condition, Rule, Trigger
from autoglm_rt.untrusted_yaml import UntrustedYAMLError, compose_untrusted

_RULE_KEYS = ("name", "description", "trigger", "for", "clear", "cooldown", "actions")


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


def read_rules(text_or_path: str | bytes | os.PathLike[str]) -> tuple[list[Rule], str]:
    """The rules of a strategy document given as YAML text or a path, and its source name (the
    path, or ``"<string>"``). Raises ConfigError naming the file, line and field for anything
    malformed; FileNotFoundError for a path that does not exist."""
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
            raise ConfigError(f"not UTF-8 text ({exc.reason})", source=source, line=None, field="<document>") from None
    return _Parser(raw, source).parse(), source


class _Parser:
    """Walks the composed YAML node tree so every error can name its line."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.loader = yaml.SafeLoader("")  # constructs scalar values from their nodes

    def error(self, message: str, node: yaml.Node | None, fld: str) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None and node.start_mark is not None else None
        return ConfigError(message, source=self.source, line=line, field=fld)

    def parse(self) -> list[Rule]:
        try:
            root = compose_untrusted(self.text)
        except UntrustedYAMLError as exc:
            raise ConfigError(exc.message, source=self.source, line=exc.line, field="<document>") from None
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
        try:
            return self.loader.construct_object(node)
        except (yaml.YAMLError, ValueError, OverflowError, TypeError, AttributeError, LookupError) as exc:
            # AttributeError/TypeError/KeyError: a tag such as !!map, !!set or !!bool on a value it cannot read.
            why = (exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None) or str(exc).splitlines()[0]
            raise self.error(f"cannot read value {node.value!r} with tag {node.tag!r}: {why}", node, fld) from None

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
        try:
            if kind == "phase" and isinstance(node, yaml.SequenceNode):
                names = values.phase_names([self.scalar(n, fld) for n in node.value])
                return Condition(metric, "in", names, line)
            value = self.scalar(node, fld)
            op, threshold = values.phase_comparison(value) if kind == "phase" else values.comparison(kind, value, fld)
        except values.InvalidValue as exc:
            raise self.error(str(exc), node, fld) from None
        return Condition(metric, op, threshold, line)

    def duration(self, node: yaml.Node, fld: str) -> float:
        value = self.scalar(node, fld)
        try:
            return values.duration(value)
        except values.InvalidValue as exc:
            raise self.error(str(exc), node, fld) from None

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
            value = self.scalar(value_node, item_fld)
            try:
                checked = values.action_value(name, value, item_fld)
            except values.InvalidValue as exc:
                raise self.error(str(exc), value_node, item_fld) from None
            specs.append(ActionSpec(name, checked, item.start_mark.line + 1))
        return tuple(specs)


def _describe(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the value {node.value!r}"


__all__ = ["ConfigError", "read_rules"]
