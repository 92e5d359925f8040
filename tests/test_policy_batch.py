"""BatchController and run_step: constant effective batch under memory pressure, OOM recovery in
the middle of a step in a real CPU training loop (every sample counted exactly once), goodput and
LR rules against references."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.goodput import lr_factor, statistical_efficiency
from autoglm_rt.policy.oom import is_out_of_memory, run_step


def test_shrink_keeps_the_effective_batch_and_chunks_tile_it() -> None:
    c = BatchController(100, 40, min_micro_batch=5)
    assert c.plan.accumulation == 3 and c.chunks() == [(0, 40), (40, 80), (80, 100)]
    sizes = []
    while (ch := c.shrink()) is not None:
        assert ch.after.effective_batch == 100
        sizes.append(c.micro_batch)
        bounds = c.chunks()
        assert bounds[0][0] == 0 and bounds[-1][1] == 100
        assert all(a[1] == b[0] for a, b in pairwise(bounds))
        assert len(bounds) == c.accumulation == math.ceil(100 / c.micro_batch)
    assert sizes == [20, 10, 5]


def test_pressure_shrinks_and_freed_memory_grows_back_but_not_to_a_failed_size() -> None:
    c = BatchController(64, 64, grow_after=3)
    c.on_oom(limit_bytes=1000)  # 64 failed under limit 1000
    assert c.micro_batch == 32
    for _ in range(5):
        c.observe_memory(100, 1000)
    assert c.micro_batch == 32  # 64 failed under this limit: not again
    assert c.observe_memory(950, 1000).reason == "pressure"  # 95% > 90%
    assert c.micro_batch == 16
    for _ in range(6):
        assert c.observe_memory(100, 1000) is None  # 32 was under pressure at this limit
    assert c.observe_memory(700, 1000) is None  # between the thresholds: calm counter resets
    grown = [c.observe_memory(100, 4000) for _ in range(6)]  # a raised limit forgets both
    assert [g.after.micro_batch for g in grown if g is not None] == [32, 64]
    assert c.micro_batch == 64 and c.effective_batch == 64


def test_pressure_and_growth_do_not_flap() -> None:
    # Usage proportional to the micro-batch: 94% at 32, 47% at 16 -- both thresholds crossed.
    c = BatchController(32, 32, grow_after=2)
    sizes = []
    for _ in range(50):
        c.observe_memory(c.micro_batch / 32 * 940, 1000)
        sizes.append(c.micro_batch)
    assert sizes == [16] * 50
    assert len(c.changes) == 1


def test_on_oom_at_the_smallest_micro_batch_re_raises() -> None:
    c = BatchController(8, 2, min_micro_batch=2)
    err = MemoryError("boom")
    with pytest.raises(MemoryError, match="boom"):
        c.on_oom(err)
    with pytest.raises(MemoryError, match="smallest"):
        c.on_oom()


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


class MemoryModel:
    """Fails like an allocator would when a micro-batch's activations exceed ``max_samples``:
    during the backward pass (mid-step, after part of the gradient has been computed)."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.failures = 0

    def attach(self, activation: torch.Tensor) -> torch.Tensor:
        n = activation.shape[0]

        def hook(grad: torch.Tensor) -> torch.Tensor:
            if n > self.max_samples:
                self.failures += 1
                raise MemoryError(f"memory model: {n} samples > {self.max_samples}")
            return grad

        activation.register_hook(hook)
        return activation


class Net(nn.Module):
    def __init__(self, memory: MemoryModel | None = None) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(32, 1)
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.memory is not None:
            h = self.memory.attach(h)
        return self.b(h)


def train(
    model: Net, x: torch.Tensor, y: torch.Tensor, controller: BatchController, steps: int, seen: list[int]
) -> None:
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    n = controller.effective_batch
    for step in range(steps):
        xs, ys = x[step * n : (step + 1) * n], y[step * n : (step + 1) * n]
        acc = [torch.zeros_like(p) for p in params]

        def process(start: int, stop: int, xs=xs, ys=ys, acc=acc, offset=step * n) -> None:  # type: ignore[no-untyped-def]
            loss = nn.functional.mse_loss(model(xs[start:stop]), ys[start:stop]) * ((stop - start) / n)
            grads = torch.autograd.grad(loss, params)  # raises before touching acc on OOM
            for a, g in zip(acc, grads, strict=True):
                a.add_(g)
            seen.extend(range(offset + start, offset + stop))

        run_step(n, process, controller)
        for p, a in zip(params, acc, strict=True):
            p.grad = a
        opt.step()


def test_oom_mid_step_in_a_real_training_loop_loses_and_repeats_no_sample() -> None:
    torch.manual_seed(0)
    steps, n = 6, 96
    x = torch.randn(steps * n, 8)
    y = torch.sin(x.sum(1, keepdim=True))
    memory = MemoryModel(max_samples=20)
    model = Net(memory)
    ref = Net()
    ref.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    ref.double()

    controller = BatchController(n, n)
    seen: list[int] = []
    train(model, x, y, controller, steps, seen)
    assert sorted(seen) == list(range(steps * n)) and len(set(seen)) == len(seen)
    assert memory.failures == 3 and controller.num_ooms == 3  # 96 -> 48 -> 24 -> 12
    assert controller.micro_batch == 12 and controller.effective_batch == n
    assert [c.reason for c in controller.changes] == ["oom"] * 3

    # Reference: float64 full-batch SGD on the same data, no memory limit.
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(ref(x[step * n : (step + 1) * n].double()), y[step * n : (step + 1) * n].double())
        loss.backward()
        opt.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)


def test_run_step_propagates_other_errors_and_gives_up_at_the_minimum() -> None:
    c = BatchController(10, 10)

    def broken(start: int, stop: int) -> None:
        raise ValueError("not memory")

    with pytest.raises(ValueError, match="not memory"):
        run_step(10, broken, c)
    assert c.micro_batch == 10

    def always_oom(start: int, stop: int) -> None:
        raise MemoryError("always")

    with pytest.raises(MemoryError, match="always"):
        run_step(10, always_oom, BatchController(10, 10, min_micro_batch=2))


def reference_goodput(batch: int, micro: int, base: int, noise: float, t_micro: float, t_fixed: float) -> float:
    steps_time = math.ceil(batch / micro) * t_micro + t_fixed
    return batch / steps_time * (noise + base) / (noise + batch)


@pytest.mark.parametrize("noise", [4.0, 64.0, 1000.0, 1e5])
def test_goodput_picks_the_reference_argmax(noise: float) -> None:
    t_micro, t_fixed = 0.01, 0.05  # a large fixed cost per step (e.g. the all-reduce)
    c = BatchController(32, 32, goodput=True, max_effective_batch=1024)
    for acc in (1, 2, 1, 3, 1, 2):
        c.observe_step_time(acc * t_micro + t_fixed, accumulation=acc)
    tm, tf = c.step_time_model()
    assert tm == pytest.approx(t_micro) and tf == pytest.approx(t_fixed)
    cands = [32 * 2**k for k in range(6)]
    best = max(cands, key=lambda b: reference_goodput(b, 32, 32, noise, t_micro, t_fixed))
    gain = reference_goodput(best, 32, 32, noise, t_micro, t_fixed) / reference_goodput(
        32, 32, 32, noise, t_micro, t_fixed
    )
    change = c.propose(noise)
    if gain > 1.05:
        assert change is not None and c.effective_batch == best and change.reason == "goodput"
    else:
        assert change is None and c.effective_batch == 32
    if noise >= 1000:
        assert c.effective_batch > 32  # a noisy gradient: a bigger batch pays
    if noise <= 4:
        assert c.effective_batch == 32  # a clean gradient: it does not


def test_goodput_hysteresis_needs_five_percent() -> None:
    # Goodput at 64 is better than at 32 by less than 5%: no change.
    t_micro, t_fixed, noise = 0.01, 0.0005, 1e6
    c = BatchController(32, 32, goodput=True, max_effective_batch=64)
    c.observe_step_time(t_micro + t_fixed, accumulation=1)
    c.observe_step_time(2 * t_micro + t_fixed, accumulation=2)
    g32 = reference_goodput(32, 32, 32, noise, t_micro, t_fixed)
    g64 = reference_goodput(64, 32, 32, noise, t_micro, t_fixed)
    assert 1.0 < g64 / g32 < 1.05
    assert c.propose(noise) is None
    assert BatchController(32, goodput=False).propose(noise) is None


def test_lr_rules_against_the_adascale_definition() -> None:
    base, batch = 32, 256
    g2, sigma2 = 0.5, 40.0  # |G|^2 and tr(Sigma) per sample
    b_simple = sigma2 / g2
    s = batch / base
    # AdaScale: r = (Var_B0 + |G|^2) / (Var_B0 / S + |G|^2), Var_B0 = tr(Sigma) / B0
    r = (sigma2 / base + g2) / (sigma2 / base / s + g2)
    assert lr_factor("adascale", batch, base, b_simple) == pytest.approx(r, rel=1e-12)
    assert 1.0 <= r <= s
    assert lr_factor("linear", batch, base) == s
    assert lr_factor("sqrt", batch, base) == pytest.approx(math.sqrt(s))
    assert lr_factor("adascale", batch, base, None) == 1.0
    assert statistical_efficiency(base, base, 123.0) == 1.0
    with pytest.raises(ValueError, match="rule"):
        lr_factor("cubic", batch, base)


@pytest.mark.parametrize(
    ("kwargs", "exc", "words"),
    [
        ({"effective_batch": 0}, ValueError, "effective_batch"),
        ({"effective_batch": 8, "micro_batch": 16}, ValueError, "micro_batch"),
        ({"effective_batch": 8.0}, TypeError, "effective_batch"),
        ({"effective_batch": 8, "micro_batch": 4, "min_micro_batch": 5}, ValueError, "min_micro_batch"),
        ({"effective_batch": 8, "pressure_low": 0.9, "pressure_high": 0.5}, ValueError, "pressure"),
        ({"effective_batch": 8, "max_effective_batch": 4}, ValueError, "max_effective_batch"),
        ({"effective_batch": 8, "lr_rule": "cubic"}, ValueError, "lr_rule"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], exc: type[Exception], words: str) -> None:
    with pytest.raises(exc, match=words):
        BatchController(**kwargs)  # type: ignore[arg-type]
    c = BatchController(8)
    with pytest.raises(ValueError, match="seconds"):
        c.observe_step_time(math.nan)


def test_adascale_rule_agrees_with_the_noise_scale_estimators_gain() -> None:
    from autoglm_rt.stats import NoiseScale

    noise = NoiseScale(beta=0.0, base_batch=32)
    # micro-batches of 8 with mean squared norm 5.0; their average (32 samples) has 2.0
    noise.update(5.0, 8, 2.0, 32)
    b = noise.b_simple
    assert b is not None
    for scale in (1.0, 2.0, 8.0, 64.0):
        assert lr_factor("adascale", 32 * scale, 32, b) == pytest.approx(noise.gain(scale), rel=1e-12)


def test_measured_compute_share_gives_the_step_time_model_directly() -> None:
    c = BatchController(32, 8, goodput=True, max_effective_batch=256)
    for _ in range(5):
        c.observe_step_time(4 * 0.01 + 0.2, compute_seconds=4 * 0.01)  # one accumulation count only
    tm, tf = c.step_time_model()
    assert tm == pytest.approx(0.01) and tf == pytest.approx(0.2)
    noise = 5000.0
    best = max((32 * 2**k for k in range(4)), key=lambda b: reference_goodput(b, 8, 32, noise, 0.01, 0.2))
    assert c.propose(noise) is not None and c.effective_batch == best == 256
    with pytest.raises(ValueError, match="compute_seconds"):
        c.observe_step_time(1.0, compute_seconds=-1.0)
