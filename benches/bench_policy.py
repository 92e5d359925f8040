"""Per-call cost of the policy layer's pieces (pytest-benchmark; CI runs each once with
--benchmark-disable, so every benchmark also asserts its result)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from autoglm_rt.policy import PhaseDetector, Strategy, bundled_strategy
from autoglm_rt.runtime import Runtime

STREAM = Path(__file__).resolve().parents[1] / "tests" / "data" / "phase_mlp_regression.csv"


def test_strategy_evaluate(benchmark) -> None:  # type: ignore[no-untyped-def]
    strategy = Strategy.from_yaml(bundled_strategy("phase_aware"))
    metrics = {"memory_usage": 0.95, "phase": "fine_tuning", "gpu_utilization": 0.3, "step_time": 0.1, "load_1min": 1.0}
    clock = iter(range(10**9))

    def evaluate() -> list[str]:
        return [a.name for a in strategy.evaluate(metrics, float(next(clock)))]

    benchmark(evaluate)
    strategy.reset()
    assert strategy.evaluate(metrics, 0.0) == []
    assert [a.name for a in strategy.evaluate(metrics, 30.0)][:2] == ["shrink_micro_batch", "alert"]


def test_phase_detector_update(benchmark) -> None:  # type: ignore[no-untyped-def]
    with STREAM.open() as f:
        rows = [(float(r["loss"]), float(r["grad_norm"]), float(r["b_simple"])) for r in csv.DictReader(f)]

    def replay() -> str:
        det = PhaseDetector()
        for loss, norm, b in rows:
            det.update(loss=loss, grad_norm=norm, b_simple=b, batch=64)
        return det.phase

    assert benchmark(replay) == "fine_tuning"


def test_runtime_step_on_a_tiny_model(benchmark) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.05), precision_by_phase={})
    x = torch.randn(64, 16)
    y = x[:, :1] * 2 - x[:, 1:2]
    losses: list[float] = []

    def one_step() -> None:
        losses.append(float(rt.forward_backward((x, y), lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]))))
        rt.step()

    for _ in range(20):
        one_step()
    benchmark(one_step)
    assert losses[-1] < 0.5 * losses[0]
