"""The pure helper of ``benches/ddp_netns.py --train`` (the benchmark itself needs root and
network namespaces and is not part of the test suite)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_netns", ROOT / "benches" / "ddp_netns.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ddp_netns"] = mod
    spec.loader.exec_module(mod)
    return mod


def _trace(losses: list[float]) -> list[dict[str, float]]:
    return [
        {"step": 10.0 * (i + 1), "wall_s": 1.5 * (i + 1), "bytes": 100.0 * (i + 1), "val_loss": v}
        for i, v in enumerate(losses)
    ]


def test_time_to_target_is_the_first_evaluation_at_or_below_it() -> None:
    time_to_target = _bench().time_to_target
    trace = _trace([3.0, 2.5, 2.2, 2.3, 2.1])
    assert time_to_target(trace, 2.2) == trace[2]  # at the target counts; the first one wins
    assert time_to_target(trace, 2.25) == trace[2]
    assert time_to_target(trace, 3.5) == trace[0]
    assert time_to_target(trace, 2.0) is None  # never reached
    assert time_to_target([], 2.0) is None
    assert time_to_target(trace, math.nan) is None  # no target (the dense run failed)
    assert time_to_target(_trace([math.nan, 2.0]), 2.5) == _trace([math.nan, 2.0])[1]  # NaN never counts
