"""Time to load a strategy "alias bomb" (nested any: groups through YAML aliases) with this
loader, and with an older loader given as a file, side by side in one process:

    git show b9e364b:python/autoglm_rt/policy/strategy.py > /tmp/strategy_old.py
    PYTHONPATH=python python benches/strategy_alias_bomb.py [/tmp/strategy_old.py]
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

from autoglm_rt.policy import ConfigError, Strategy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_strategy_hostile import alias_bomb


def load_time(cls: type, text: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    try:
        cls.from_yaml(text)
        outcome = "loaded"
    except ValueError as exc:  # both loaders' ConfigError is a ValueError
        outcome = type(exc).__name__
    return time.perf_counter() - t0, outcome


def main(argv: list[str]) -> int:
    old = None
    if argv:
        spec = importlib.util.spec_from_file_location("strategy_old", argv[0])
        assert spec is not None and spec.loader is not None
        old = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = old  # dataclasses look their module up while it executes
        spec.loader.exec_module(old)
    for levels in (4, 5, 6):
        text = alias_bomb(levels)
        new_s, new_outcome = load_time(Strategy, text)
        line = f"levels {levels} ({len(text)} bytes, {9**levels} conditions expanded): "
        line += f"new {new_s * 1e3:.2f} ms {new_outcome}"
        if old is not None:
            old_s, old_outcome = load_time(old.Strategy, text)
            line += f"; old {old_s:.3f} s {old_outcome}; ratio {old_s / new_s:.0f}x"
        print(line)
    assert issubclass(ConfigError, ValueError)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
