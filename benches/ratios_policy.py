"""Runtime overhead on a small real model: the same training steps through ``autoglm_rt.Runtime``
and through the plain PyTorch loop a user would otherwise write, alternating in one process.

Model: a small CNN (3 conv layers with batch norm, like ../shared/traces' CNN) on 16x16x3 inputs,
AdamW, batch 32. Ratios are plain / runtime time per step (>= 0.97 means overhead <= 3%), on the
process's CPU time with one torch thread (robust on a shared machine) and on the wall clock.
Both loops run in float32 (``precision_by_phase={}``), so the comparison is like for like.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from autoglm_rt import benchmarking
from autoglm_rt.policy import PhaseDetector, Strategy, bundled_strategy
from autoglm_rt.runtime import BatchConfig, Hooks, Runtime


def make_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 10),
    )


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def cpu_time_compare(
    name: str, case: Callable[[], None], baseline: Callable[[], None], rounds: int
) -> benchmarking.Comparison:
    """benchmarking.compare on this process's CPU time (time.process_time): on a shared,
    overloaded machine the wall clock mostly measures the other tenants; the CPU time this process
    spends does not (the torch threads are set to 1 around it so CPU time is work, not spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cmp = benchmarking.compare(
            name, case, baseline, case_label="Runtime", baseline_label="plain torch loop",
            rounds=rounds, min_time=0.0, clock=time.process_time,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    cmp.extra["clock"] = "process CPU time, 1 torch thread"
    return cmp


def compare_one(
    data: list[tuple[torch.Tensor, torch.Tensor]], batch: int, micro: int, rounds: int, min_time: float
) -> list[benchmarking.Comparison]:
    plain_model, rt_model = make_cnn(), make_cnn()
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=1e-3)
    accumulation = batch // micro

    def plain_loop() -> None:
        for x, y in data:
            for i in range(accumulation):
                sl = slice(i * micro, (i + 1) * micro)
                (loss_fn(plain_model, (x[sl], y[sl])) / accumulation).backward()
            plain_opt.step()
            plain_opt.zero_grad(set_to_none=True)

    rt = Runtime(
        rt_model,
        torch.optim.AdamW(rt_model.parameters(), lr=1e-3),
        strategy=Strategy.from_yaml(bundled_strategy("phase_aware")),
        precision_by_phase={},
        phase_detector=PhaseDetector(),
        batch=BatchConfig(micro_batch=micro),
        hooks=Hooks(metrics_source=lambda: {"gpu_utilization": 0.5, "cpu_usage": 0.5, "load_1min": 1.0}),
    )
    overheads: list[float] = []
    step_times: list[float] = []

    def runtime_loop() -> None:
        for _, b in rt.batches(data):
            rt.forward_backward(b, loss_fn)
            r = rt.step()
            overheads.append(r.overhead_seconds)
            if r.step_seconds:
                step_times.append(r.step_seconds)

    cpu = cpu_time_compare(
        f"Runtime vs plain loop, micro {micro}x{accumulation}, CPU time", runtime_loop, plain_loop, rounds
    )
    cmp = benchmarking.compare(
        f"Runtime vs plain loop, micro {micro}x{accumulation}, wall",
        runtime_loop,
        plain_loop,
        case_label="Runtime",
        baseline_label="plain torch loop",
        rounds=rounds,
        min_time=min_time,
    )
    steps = len(data)
    cmp.case_seconds /= steps
    cmp.baseline_seconds /= steps
    cpu.case_seconds /= steps
    cpu.baseline_seconds /= steps
    cmp.extra = {
        "step_overhead_seconds_median": statistics.median(overheads),
        "step_seconds_median": statistics.median(step_times),
        "overhead_fraction_of_step": statistics.median(overheads) / statistics.median(step_times),
        "noise_scale_last": rt.policy_metrics()["noise_scale"],
        "torch_threads": torch.get_num_threads(),
    }
    return [cpu, cmp]


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    batch, steps = 32, 2
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)) for _ in range(steps)
    ]
    rounds = 3 if ctx.quick else 21
    min_time = 0.2 if ctx.quick else 0.5
    return [c for micro in (32, 8) for c in compare_one(data, batch, micro, rounds, min_time)]
