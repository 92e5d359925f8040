"""``state_dict()`` / ``load_state_dict()`` for the policy layer's plain-Python objects.

A class lists the attributes that change while it runs in ``_state_fields``; the mixin saves
copies of them (deques as lists, containers deep-copied, so a saved state never aliases the live
object; a ``Stateful`` attribute as its own ``state_dict()``) and restores them, checking that
the keys match. Configuration (thresholds, gains) is not
state: it comes from the constructor, so a resumed object is built the same way and then loaded.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Mapping
from typing import Any, ClassVar


class Stateful:
    """Mixin: ``state_dict()`` returns a dict of plain copies of ``_state_fields``;
    ``load_state_dict(state)`` restores them and raises ValueError on missing or unknown keys,
    without changing anything."""

    _state_fields: ClassVar[tuple[str, ...]] = ()

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self._state_fields:
            value = getattr(self, name)
            if isinstance(value, Stateful):
                out[name] = value.state_dict()
            else:
                out[name] = list(value) if isinstance(value, deque) else copy.deepcopy(value)
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        cls = type(self).__name__
        if not isinstance(state, Mapping):
            raise TypeError(f"{cls}.load_state_dict: expected a dict from state_dict(), got {type(state).__name__}")
        missing = [k for k in self._state_fields if k not in state]
        unknown = [k for k in state if k not in self._state_fields]
        if missing or unknown:
            raise ValueError(
                f"{cls}.load_state_dict: state does not match this object (missing {missing}, unknown {unknown})"
            )
        # Nested parts first: each checks its keys before it changes anything.
        plain = []
        for name in self._state_fields:
            current = getattr(self, name)
            if isinstance(current, Stateful):
                current.load_state_dict(state[name])
            else:
                plain.append((name, current))
        for name, current in plain:
            value = state[name]
            value = deque(value, maxlen=current.maxlen) if isinstance(current, deque) else copy.deepcopy(value)
            setattr(self, name, value)


__all__ = ["Stateful"]
