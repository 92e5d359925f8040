"""A Runtime saved with ``state_dict()`` and loaded into a fresh one continues exactly as an
uninterrupted run: the same parameters bit for bit, the same phases, batch plans, noise scale,
LR, strategy decisions (``for``/``cooldown`` timers included) and counters -- through a real
``torch.save``/``torch.load`` round trip. (The first step after a resume has no step time, as
the first step of any run: policies fed by step times see one observation fewer.)"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

from autoglm_rt.policy import Strategy
from autoglm_rt.policy.phase import PhaseDetector
from autoglm_rt.runtime import BatchConfig, Hooks, Runtime

STRATEGY = """
strategies:
  - name: halve-when-fine-tuning
    trigger: {phase: fine_tuning}
    actions: [{shrink_micro_batch: true}]
  - name: noisy
    trigger: {noise_scale: ">=1"}
    clear: {noise_scale: "<1"}
    for: 1s
    cooldown: 2s
    actions: [{alert: "noisy gradients"}]
  - name: unstable
    trigger: {unstable: true}
    actions: [{grow_micro_batch: true}]
"""


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Runtime, list[float]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    now = [0.0]

    def clock() -> float:
        now[0] += 0.25  # a deterministic clock: every call is 250 ms later
        return now[0]

    rt = Runtime(
        model,
        opt,
        strategy=Strategy.from_yaml(STRATEGY),
        precision_by_phase={},
        phase_detector=PhaseDetector(window=4, confirm=1, min_dwell=2),
        batch=BatchConfig(micro_batch=8),
        hooks=Hooks(clock=clock),
    )
    return model, opt, rt, now


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.3 * torch.randn(16, 1, generator=g)


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    return nn.functional.mse_loss(model(batch[0]), batch[1])


def run(rt: Runtime, steps: range) -> list[tuple[Any, ...]]:
    seen = []
    for s in steps:
        rt.forward_backward(batches(s), mse)
        r = rt.step()
        seen.append(
            (r.step, r.loss, r.phase, r.micro_batch, r.accumulation, r.noise_scale, [a.action.name for a in r.actions])
        )
    return seen


@pytest.mark.parametrize("cut", [3, 11, 17])
def test_a_resumed_runtime_continues_exactly(cut: int) -> None:
    steps = 24
    model_a, opt_a, rt_a, _ = make()
    whole = run(rt_a, range(steps))

    model_b, opt_b, rt_b, _ = make()
    first = run(rt_b, range(cut))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "rt": rt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model_c, opt_c, rt_c, _ = make(seed=99)  # other weights: everything must come from the checkpoint
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    rt_c.load_state_dict(ckpt["rt"])
    rest = run(rt_c, range(cut, steps))

    assert first + rest == whole
    for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]
    sa, sc = rt_a.state_dict(), rt_c.state_dict()
    # Strategy timers count run time, not the downtime of the interruption: the ages differ by
    # the one step interval the resumed clock never saw; the rules' states are the same.
    strat_a, strat_c = sa["pipeline"].pop("strategy"), sc["pipeline"].pop("strategy")
    # Likewise the step-time samples: the resumed run has one fewer (no time for its first step).
    timings_a, timings_c = sa["pipeline"]["batch"].pop("_timings"), sc["pipeline"]["batch"].pop("_timings")
    assert len(timings_c) == len(timings_a) - 1
    assert sa == sc
    assert {n: r["state"] for n, r in strat_a["rules"].items()} == {n: r["state"] for n, r in strat_c["rules"].items()}


def test_the_run_exercises_what_resume_must_carry() -> None:
    _, _, rt, _ = make()
    seen = run(rt, range(24))
    phases = {s[2] for s in seen}
    assert len(phases) >= 2, phases  # a phase change happened
    assert len({s[3] for s in seen}) >= 2  # the micro-batch changed
    assert any(s[5] is not None for s in seen)  # a noise scale was estimated
    assert any(s[6] for s in seen)  # a strategy fired


def test_loading_a_mismatched_state_raises_and_changes_nothing() -> None:
    _, _, rt, _ = make()
    run(rt, range(3))
    before = rt.state_dict()
    bad = rt.state_dict()
    del bad["pipeline"]["phase"]["phase"]
    with pytest.raises(ValueError, match="missing"):
        rt.load_state_dict(bad)
    other = Runtime(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
    with pytest.raises(ValueError, match="strategy"):
        other.load_state_dict(before)
    assert rt.state_dict() == before
