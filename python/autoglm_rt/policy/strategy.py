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

Parsing (``policy.strategy_file``) treats files as untrusted input and raises ``ConfigError``
naming the file, line and field; the metrics, actions and rule types live in
``policy.strategy_rules``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from autoglm_rt.policy.strategy_file import read_rules
from autoglm_rt.policy.strategy_rules import Action, Rule


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
        self._rebase: dict[str, dict[str, Any]] = {}

    @classmethod
    def from_yaml(cls, text_or_path: str | bytes | os.PathLike[str]) -> Strategy:
        """Parses a strategy document given as YAML text or a path (a ``PathLike``, or a one-line
        string that names an existing file or ends in ``.yaml``/``.yml``). Raises ConfigError
        naming the file, line and field for anything malformed; FileNotFoundError for a path that
        does not exist."""
        rules, source = read_rules(text_or_path)
        return cls(rules, source=source)

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
        self._rebase = {}

    def state_dict(self) -> dict[str, Any]:
        """Each rule's state with its times as ages before the last evaluation, so a resumed run
        (whose clock starts anew) continues the same ``for``/``cooldown`` countdowns."""
        last = self._last_now
        rules: dict[str, Any] = {}
        for name, st in self._states.items():
            rules[name] = {
                "state": st.state,
                "pending_age": None if last is None or st.state != "pending" else last - st.pending_since,
                "fired_age": None if last is None or st.last_fired is None else last - st.last_fired,
            }
        return {"rules": rules}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict`'s output; the ages are counted from the next ``evaluate``.
        Raises ValueError (changing nothing) when the rules differ from this strategy's."""
        rules = state.get("rules") if isinstance(state, Mapping) else None
        if not isinstance(rules, Mapping) or set(rules) != set(self._states):
            have = sorted(rules) if isinstance(rules, Mapping) else rules
            raise ValueError(f"Strategy.load_state_dict: expected the rules {sorted(self._states)}, got {have}")
        for name, saved in rules.items():
            if saved.get("state") not in ("inactive", "pending", "firing"):
                raise ValueError(f"Strategy.load_state_dict: rule {name!r} has an unknown state {saved.get('state')!r}")
        self._rebase = {name: dict(saved) for name, saved in rules.items()}
        self._states = {r.name: _RuleState() for r in self.rules}
        self._last_now = None

    def _apply_rebase(self, now: float) -> None:
        for name, saved in self._rebase.items():
            st = self._states[name]
            st.state = saved["state"]
            if saved["pending_age"] is not None:
                st.pending_since = now - saved["pending_age"]
            if saved["fired_age"] is not None:
                st.last_fired = now - saved["fired_age"]
        self._rebase = {}

    def evaluate(self, metrics: Mapping[str, Any], now: float) -> list[Action]:
        """Feeds one observation of the metrics at time ``now`` (seconds, non-decreasing) and returns
        the actions of every rule that starts firing now, in file order. Metrics a rule does not
        read are ignored; a missing or NaN metric never satisfies a condition."""
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise ValueError(f"now: expected a finite time in seconds, got {now!r}")
        if self._last_now is not None and now < self._last_now:
            raise ValueError(f"now: time went backwards ({now} < {self._last_now})")
        self._last_now = now
        if self._rebase:
            self._apply_rebase(now)
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


__all__ = ["Strategy"]
