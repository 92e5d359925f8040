"""The Runtime's memory escalation with ``MemoryConfig(offload=...)``: micro-batch first, then the
optimizer state to disk, then a reported failure; restored after calm steps; bit-identical
trajectories whatever the placement (against the numpy Adam reference); checkpoints; metrics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from autoglm_rt.monitor.exporter import MetricsExporter
from autoglm_rt.offload import EscalationConfig, OptimizerOffload
from autoglm_rt.policy import Strategy
from autoglm_rt.policy.phase import PhaseDetector
from autoglm_rt.runtime import BatchConfig, MemoryConfig, Runtime, StepReport
from tests.adam_reference import adam_step

MB = 10**6
LR, WD = 1e-2, 0.05


class ScriptedMemory:
    """A memory signal whose limit and per-step peak the test sets (the pool interface the
    Runtime reads: ``stats()``, ``set_limit()`` as the job's own cap, ``reset_peak_stats()``)."""

    def __init__(self, limit: int, peak: int) -> None:
        self.hard, self.peak, self.cap = limit, peak, None

    def stats(self) -> dict[str, Any]:
        limit = self.hard if self.cap is None else min(self.hard, self.cap)
        return {"limit_bytes": limit, "allocated_bytes": self.peak // 2, "peak_allocated_bytes": self.peak}

    def set_limit(self, limit: Any) -> None:
        self.cap = None if limit is None else int(limit)

    def reset_peak_stats(self) -> None:
        """Nothing to reset: the test sets each step's peak itself (``self.peak``)."""


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def batch_of(step: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def make_runtime(
    model: nn.Module,
    signal: ScriptedMemory | None,
    *,
    micro: int = 8,
    floor: int = 8,
    offload: Any = "disk",
    calm: int = 3,
    strategy: Strategy | None = None,
) -> Runtime:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    if isinstance(offload, type) and offload is OptimizerOffload:
        offload = OptimizerOffload(opt, tier="disk")
    return Runtime(
        model,
        opt,
        strategy=strategy,
        pool=signal,
        phase_detector=PhaseDetector(window=1000),
        precision_by_phase={},
        batch=BatchConfig(effective_batch=8, micro_batch=micro, min_micro_batch=floor),
        memory=MemoryConfig(
            capacity=10**12,
            limits={"initial": 1.0, "convergence": 1.0, "fine_tuning": 1.0},
            threads_by_phase=False,
            offload=offload,
            escalation=EscalationConfig(high_ratio=0.9, low_ratio=0.7, calm_steps=calm),
        ),
    )


def escalations(report: StepReport) -> list[tuple[Any, bool]]:
    return [(r.action.value, r.applied) for r in report.actions if r.action.strategy == "memory_escalation"]


def test_pressure_shrinks_the_micro_batch_first_then_offloads_then_reports_failure_then_restores() -> None:
    signal = ScriptedMemory(limit=1000 * MB, peak=100 * MB)
    rt = make_runtime(make_model(), signal, micro=8, floor=1)
    exporter = MetricsExporter(rank=0, host_metrics=False)
    rt.attach(exporter)
    assert rt.offloading is not None
    off = rt.offloading.offload
    seen = []
    for step in range(16):
        if step == 2:
            signal.hard = 100 * MB  # peak at 95% of the limit from now on
            signal.peak = 95 * MB
        if step == 9:
            signal.hard = 1000 * MB  # room again: 10% of the limit
            signal.peak = 100 * MB
        rt.forward_backward(batch_of(step), mse)
        report = rt.step()
        seen.append((report.micro_batch, report.optimizer_offloaded, escalations(report)))
    micro = [m for m, _, _ in seen]
    # steps 2, 3, 4: the batch controller halves 8 -> 4 -> 2 -> 1; nothing is offloaded meanwhile
    assert micro[:5] == [8, 8, 4, 2, 1] and all(not o and not e for _, o, e in seen[:5])
    # step 5 ran at the smallest micro-batch under pressure: the state goes to disk
    assert seen[5][2] == [(True, True)] and seen[5][1] is True
    # step 6: nothing left to do: reported once as not applied, not again at step 7
    assert seen[6][2] == [(True, False)] and seen[7][2] == [] and seen[8][2] == []
    # steps 9, 10, 11 calm (calm_steps=3): restored at the third, not before
    assert [e for _, _, e in seen[9:11]] == [[], []] and seen[11][2] == [(False, True)]
    assert seen[11][1] is False and off.resident_bytes() == rt.offloading.state_bytes() > 0
    assert all(not e for _, _, e in seen[12:])
    # counters: actions_total and the offload source
    text = exporter.render().decode()
    assert 'autoglm_rt_actions_total{action="offload_optimizer_state",applied="true",rank="0"} 2.0' in text
    assert 'autoglm_rt_actions_total{action="offload_optimizer_state",applied="false",rank="0"} 1.0' in text
    assert 'autoglm_rt_optimizer_state_offloads_total{rank="0"} 1.0' in text
    assert 'autoglm_rt_optimizer_state_restores_total{rank="0"} 1.0' in text
    assert 'autoglm_rt_optimizer_state_offloaded{rank="0"} 0.0' in text
    assert f'autoglm_rt_optimizer_state_bytes{{rank="0"}} {float(rt.offloading.state_bytes())}' in text


def test_restore_waits_until_the_state_fits_below_the_low_ratio() -> None:
    signal = ScriptedMemory(limit=100 * MB, peak=95 * MB)
    rt = make_runtime(make_model(), signal)
    assert rt.offloading is not None
    rt.forward_backward(batch_of(0), mse)
    assert escalations(rt.step()) == [(True, True)]  # micro-batch already at its floor: offload at once
    state = rt.offloading.state_bytes()
    signal.hard = 100 * MB
    signal.peak = 70 * MB - state + 1  # calm, but usage + state would end above 70% of the limit
    for step in range(1, 8):
        rt.forward_backward(batch_of(step), mse)
        assert escalations(rt.step()) == [] and rt.offloading.offload.offloaded
    signal.peak = 70 * MB - state  # calm for long enough already: back at the first step it fits
    rt.forward_backward(batch_of(8), mse)
    assert escalations(rt.step()) == [(False, True)] and not rt.offloading.offload.offloaded


def numpy_adamw(steps: int) -> list[np.ndarray]:
    """The same training with plain torch gradients and the numpy Adam reference."""
    model = make_model()
    params = [p.detach().numpy().copy() for p in model.parameters()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for step in range(steps):
        with torch.no_grad():
            for p, value in zip(model.parameters(), params, strict=True):
                p.copy_(torch.from_numpy(value))
        model.zero_grad()
        mse(model, batch_of(step)).backward()
        for i, p in enumerate(model.parameters()):
            assert p.grad is not None
            params[i], m[i], v[i] = adam_step(
                params[i], p.grad.numpy(), m[i], v[i], step + 1, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=WD, decoupled=True,
            )  # fmt: skip
    return params


def test_trajectory_is_bit_identical_whatever_the_placement() -> None:
    steps = 14
    runs = {}
    for name, pressure in (("never", ()), ("offloaded at 3, restored at 8", range(3, 6))):
        signal = ScriptedMemory(limit=100 * MB, peak=10 * MB)
        rt = make_runtime(make_model(), signal, offload=OptimizerOffload)
        placements = []
        for step in range(steps):
            signal.peak = 95 * MB if step in pressure else 10 * MB
            rt.forward_backward(batch_of(step), mse)
            placements.append(rt.step().optimizer_offloaded)
        runs[name] = ([p.detach().clone() for p in rt.model.parameters()], placements)
        assert rt.offloading is not None
        rt.offloading.offload.close()  # removes the temporary directory it made
    assert runs["never"][1] == [False] * steps
    assert runs["offloaded at 3, restored at 8"][1] == [False] * 3 + [True] * 5 + [False] * 6
    reference = numpy_adamw(steps)
    for got, moved, ref in zip(runs["never"][0], runs["offloaded at 3, restored at 8"][0], reference, strict=True):
        assert torch.equal(got, moved)
        np.testing.assert_array_equal(got.numpy(), ref)


def test_checkpoint_while_offloaded_resumes_offloaded_and_identical(tmp_path) -> None:
    signal = ScriptedMemory(limit=100 * MB, peak=95 * MB)
    rt = make_runtime(make_model(), signal)
    for step in range(3):
        rt.forward_backward(batch_of(step), mse)
        rt.step()
    assert rt.offloading is not None and rt.offloading.offload.offloaded
    path = tmp_path / "ckpt.pt"
    torch.save({"model": rt.model.state_dict(), "opt": rt.optimizer.state_dict(), "rt": rt.state_dict()}, path)
    for step in range(3, 6):
        rt.forward_backward(batch_of(step), mse)
        rt.step()

    ckpt = torch.load(path, weights_only=False)
    resumed = make_runtime(make_model(), ScriptedMemory(limit=100 * MB, peak=95 * MB))
    resumed.model.load_state_dict(ckpt["model"])
    resumed.optimizer.load_state_dict(ckpt["opt"])
    resumed.load_state_dict(ckpt["rt"])
    assert resumed.offloading is not None
    assert resumed.offloading.offload.offloaded and resumed.offloading.offload.resident_bytes() == 0
    assert resumed.offloading.offloads == 1
    for step in range(3, 6):
        resumed.forward_backward(batch_of(step), mse)
        resumed.step()
    for a, b in zip(rt.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    # the optimizer state loaded into an already-offloaded runtime goes to its file as well
    resumed.optimizer.load_state_dict(ckpt["opt"])
    resumed.load_state_dict(ckpt["rt"])
    assert resumed.offloading.offload.resident_bytes() == 0


def test_strategy_action_goes_through_the_same_offload() -> None:
    strategy = Strategy.from_yaml(
        """
strategies:
  - name: tight
    trigger: {step_time: ">=0s"}
    actions:
      - offload_optimizer_state: true
"""
    )
    rt = make_runtime(make_model(), ScriptedMemory(limit=1000 * MB, peak=10 * MB), strategy=strategy)
    results = []
    for step in range(5):
        rt.forward_backward(batch_of(step), mse)
        results.append([(r.action.name, r.action.value, r.action.strategy, r.applied) for r in rt.step().actions])
    # the rule fires once (edge-triggered) at the first step with a step time
    assert results[:2] == [[], [("offload_optimizer_state", True, "tight", True)]]
    # the request restarted the calm count: restored after calm_steps=3 calm steps from there
    assert results[2:] == [[], [("offload_optimizer_state", False, "memory_escalation", True)], []]
    assert rt.offloading is not None and (rt.offloading.offloads, rt.offloading.restores) == (1, 1)
    assert rt.offloading.set_offloaded(True) and not rt.offloading.set_offloaded(True)  # moved once only


def test_without_a_memory_signal_the_offload_only_steps() -> None:
    rt = make_runtime(make_model(), None)
    for step in range(2):
        rt.forward_backward(batch_of(step), mse)
        report = rt.step()
    assert report.optimizer_offloaded is False and escalations(report) == []


def test_bad_configuration() -> None:
    model = make_model()
    with pytest.raises(ValueError, match="expected an OptimizerOffload or one of host, disk, got 'nvme'"):
        make_runtime(model, None, offload="nvme")
    with pytest.raises(TypeError, match="expected an OptimizerOffload or a tier name"):
        make_runtime(model, None, offload=3)
    with pytest.raises(ValueError, match="tier 'host' moves state off a CUDA device"):
        make_runtime(model, None, offload="host")
    other = OptimizerOffload(torch.optim.AdamW(model.parameters()), tier="disk")
    with pytest.raises(ValueError, match="manages another optimizer"):
        make_runtime(model, None, offload=other)
    with pytest.raises(TypeError, match="Adam"):
        Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), memory=MemoryConfig(offload="disk"))
    with pytest.raises(TypeError, match="expected an EscalationConfig"):
        Runtime(model, torch.optim.AdamW(model.parameters()), memory=MemoryConfig(offload="disk", escalation=0.9))
    plain = Runtime(model, torch.optim.AdamW(model.parameters()), batch=BatchConfig(effective_batch=8))
    with_offload = make_runtime(make_model(), None)
    with pytest.raises(ValueError, match=r"memory\.offload is set on one side only"):
        plain.load_state_dict(with_offload.state_dict())
    with pytest.raises(ValueError, match=r"memory\.offload is set on one side only"):
        with_offload.load_state_dict(plain.state_dict())
    bad = with_offload.state_dict()
    bad["offload"] = {**bad["offload"], "offloaded": "yes"}
    with pytest.raises(ValueError, match="'offloaded' must be a bool"):
        with_offload.load_state_dict(bad)
