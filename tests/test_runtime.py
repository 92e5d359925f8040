"""autoglm_rt.Runtime on real CPU training loops: equal to a plain loop, exact accumulation, OOM
recovery under a real pool limit, re-batching, skipped non-finite steps, phase -> pool limit and
precision, strategy actions with real effects, metrics."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

import autoglm_rt
from autoglm_rt.memory import CachingPool
from autoglm_rt.policy import Strategy
from autoglm_rt.policy.phase import PhaseDetector
from autoglm_rt.runtime import BatchConfig, Hooks, MemoryConfig, Runtime, StepReport, ThreadConfig

MiB = 2**20


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def make_data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def mse(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def reference_sgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, lr: float) -> nn.Module:
    """Float64 full-batch SGD: the gradient of each step's mean loss, no tricks."""
    ref = make_model()
    ref.load_state_dict(model.state_dict())
    ref.double()
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for s in range(0, len(x), batch):
        opt.zero_grad()
        nn.functional.mse_loss(ref(x[s : s + batch].double()), y[s : s + batch].double()).backward()
        opt.step()
    return ref


def loader(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_runtime_is_an_autoglm_rt_attribute() -> None:
    assert autoglm_rt.Runtime is Runtime


def test_one_micro_batch_per_step_equals_a_plain_loop() -> None:
    x, y = make_data(640)
    plain, model = make_model(), make_model()
    opt_p = torch.optim.SGD(plain.parameters(), lr=0.1)
    for xb, yb in loader(x, y, 32):
        opt_p.zero_grad()
        mse(plain, (xb, yb)).backward()
        opt_p.step()
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={})
    reports = []
    for _, batch in rt.batches(loader(x, y, 32)):
        rt.forward_backward(batch, mse)
        reports.append(rt.step())
    assert len(reports) == 20 and all(r.accumulation == 1 and not r.skipped for r in reports)
    for p, q in zip(plain.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_accumulation_matches_float64_full_batch_sgd_and_estimates_noise() -> None:
    x, y = make_data(64 * 30)
    model = make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rt = Runtime(
        model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={}, batch=BatchConfig(micro_batch=16)
    )
    for _, batch in rt.batches(loader(x, y, 64)):
        rt.forward_backward(batch, mse)
        report = rt.step()
    assert report.accumulation == 4 and report.micro_batch == 16
    assert report.noise_scale is not None and report.noise_scale > 0
    init = make_model()
    init.load_state_dict(start)
    ref = reference_sgd(init, x, y, 64, 0.1)
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)


def test_single_process_noise_scale_pairs_the_micro_batches_with_the_whole_batch() -> None:
    """The small-batch sample is the mean of the micro-batches' squared mean-loss gradient norms,
    the large one the step's accumulated gradient: checked against norms computed by plain torch
    on a replica that follows the same SGD trajectory."""
    from autoglm_rt.stats import NoiseScale

    x, y = make_data(64 * 3)
    model, replica = make_model(), make_model()
    opt_r = torch.optim.SGD(replica.parameters(), lr=0.1)
    rt = Runtime(
        model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={}, batch=BatchConfig(micro_batch=16)
    )
    expected = NoiseScale()
    for _, (xb, yb) in rt.batches(loader(x, y, 64)):

        def sqnorm(loss: torch.Tensor) -> float:
            grads = torch.autograd.grad(loss, list(replica.parameters()))
            return float(sum(g.double().pow(2).sum() for g in grads))

        small = sum(sqnorm(mse(replica, (xb[i : i + 16], yb[i : i + 16]))) for i in range(0, 64, 16)) / 4
        opt_r.zero_grad()
        full = mse(replica, (xb, yb))
        big = sqnorm(full)
        mse(replica, (xb, yb)).backward()
        opt_r.step()
        expected.update(small, 16, big, 64)
        rt.forward_backward((xb, yb), mse)
        report = rt.step()
        assert expected.b_simple is not None and report.noise_scale is not None
        assert report.noise_scale == pytest.approx(float(expected.b_simple), rel=1e-3)


def test_fused_and_unfused_accumulation_agree() -> None:
    """float32 CPU gradients are added and measured by the native add_sumsq_; the general path
    (torch's foreach add and grad_stats) must give the same gradients and squared norms."""
    from autoglm_rt.policy.batch import BatchController
    from autoglm_rt.runtime.accumulation import Accumulator

    x, y = make_data(48)
    results = []
    for fused in (True, False):
        model = make_model()
        params = list(model.parameters())
        acc = Accumulator(model, params, contextlib.nullcontext, lambda: None)
        assert acc.fused_norms  # float32 on the CPU
        acc.fused_norms = fused
        loss = acc.run((x, y), 48, mse, BatchController(48, micro_batch=16))
        results.append((float(loss), [p.grad.clone() for p in params], acc.take_sqnorms()))
    (loss_a, grads_a, norms_a), (loss_b, grads_b, norms_b) = results
    assert loss_a == loss_b and len(norms_a) == len(norms_b) == 3
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b, strict=True))
    for (sq_a, n_a), (sq_b, n_b) in zip(norms_a, norms_b, strict=True):
        assert n_a == n_b == 16 and sq_a == pytest.approx(sq_b, rel=1e-6)


class PoolBackedNet(nn.Module):
    """The MLP, with its activations' memory taken from a real CachingPool: 64 KiB per sample from
    the forward pass until the next forward (as an allocator would hold them), and as much again
    as workspace during backward -- so an allocation beyond the pool's limit can fail in the
    forward pass or halfway through the backward pass."""

    def __init__(self, pool: CachingPool) -> None:
        super().__init__()
        self.body = make_model()
        self.pool = pool
        self.live: list[int] = []

    def release(self) -> None:
        while self.live:
            self.pool.deallocate(self.live.pop())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.release()
        n = x.shape[0]
        self.live.append(self.pool.allocate(n * 64 * 1024))
        h = torch.tanh(self.body[0](x))
        pool = self.pool

        def workspace(grad: torch.Tensor) -> torch.Tensor:
            pool.deallocate(pool.allocate(n * 64 * 1024))
            return grad

        h.register_hook(workspace)
        return self.body[2](h)


def test_oom_under_a_real_pool_limit_is_recovered_with_every_sample_counted_once() -> None:
    pool = CachingPool("cpu", limit="2560Ki")  # 96 and 48 fail in forward, 24 in backward
    model = PoolBackedNet(pool)
    start = {k: v.clone() for k, v in model.body.state_dict().items()}
    x, y = make_data(96 * 5)
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={})
    for _, batch in rt.batches(loader(x, y, 96)):
        rt.forward_backward(batch, mse)
        report = rt.step()
    assert rt.ooms_recovered == 3 and pool.stats()["num_ooms"] >= 3
    assert report.micro_batch == 12 and report.effective_batch == 96 and report.accumulation == 8
    assert [c.reason for c in rt.controller.changes] == ["oom", "oom", "oom"]
    model.release()
    assert pool.stats()["allocated_bytes"] == 0  # nothing leaked by the failed micro-batches
    pool.check()
    init = make_model()
    init.load_state_dict(start)
    ref = reference_sgd(init, x, y, 96, 0.1)
    for p, r in zip(model.body.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)


def test_batches_rechunks_to_the_effective_batch_without_losing_samples() -> None:
    ids = torch.arange(100)
    model = make_model()
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), batch=BatchConfig(effective_batch=32))
    got = [
        b["id"] for _, b in rt.batches([{"id": ids[i : i + 10], "x": ids[i : i + 10] * 2} for i in range(0, 100, 10)])
    ]
    assert [len(b) for b in got] == [32, 32, 32, 4]
    assert torch.equal(torch.cat(got), ids)
    rt2 = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), batch=BatchConfig(effective_batch=10))
    items = [(ids[i : i + 10],) for i in range(0, 30, 10)]
    passed = [b for _, b in rt2.batches(items)]
    assert all(a is b for a, b in zip(passed, items, strict=True))  # same size: untouched
    with pytest.raises(ValueError, match="disagree"):
        list(rt2.batches([(ids[:10], ids[:9])]))


def test_nonfinite_gradient_skips_the_step_and_flags_instability() -> None:
    model = make_model()
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={})
    x, y = make_data(32)
    before = [p.detach().clone() for p in model.parameters()]
    rt.forward_backward((x, y), lambda m, b: mse(m, b) * float("nan"))
    report = rt.step()
    assert report.skipped and report.unstable and report.nonfinite > 0 and rt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    rt.forward_backward((x, y), mse)
    assert not rt.step().skipped


def test_phase_change_sets_the_pool_limit_and_bfloat16_autocast() -> None:
    pool = CachingPool("cpu")
    model = make_model()
    dtypes: list[torch.dtype] = []

    def loss_fn(m: nn.Module, batch: Any) -> torch.Tensor:
        out = m(batch[0])
        dtypes.append(out.dtype)
        return nn.functional.mse_loss(out.float(), batch[1])

    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),  # a flat loss: a plateau from the start
        pool=pool,
        phase_detector=PhaseDetector(window=5, confirm=1, min_dwell=0),
        memory=MemoryConfig(capacity="64Mi", threads_by_phase=False),
    )
    x, y = make_data(32)
    phases = []
    for _ in range(14):
        rt.forward_backward((x, y), loss_fn)
        phases.append(rt.step().phase)
    assert phases[0] == "initial" and phases[-1] == "fine_tuning"
    switch = phases.index("fine_tuning")
    assert pool.limit == int(0.3 * 64 * MiB)
    assert rt.precision == "bfloat16"
    assert set(dtypes[: switch + 1]) == {torch.float32} and set(dtypes[switch + 1 :]) == {torch.bfloat16}


def test_strategy_actions_have_real_effects() -> None:
    pool = CachingPool("cpu")
    alerts: list[str] = []
    strategy = Strategy.from_yaml(
        """
strategies:
  - name: slow
    trigger: {step_time: ">=0s"}
    actions:
      - shrink_micro_batch: true
      - alert: "steps are slow"
  - name: grow-out
    trigger: {phase: initial, memory_usage: "<50%"}
    actions:
      - scale_up_replicas: 2
      - adjust_gpu_memory_limit: "50%"
      - set_precision: float16
"""
    )
    model = make_model()
    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        strategy=strategy,
        pool=pool,
        batch=BatchConfig(micro_batch=32),
        memory=MemoryConfig(
            capacity="64Mi",
            limits={"initial": "48Mi", "convergence": "32Mi", "fine_tuning": "16Mi"},
            threads_by_phase=False,
        ),
        hooks=Hooks(alert=lambda a: alerts.append(a.value), metrics_source=lambda: {"gpu_utilization": 0.1}),
    )
    pool.set_limit("48Mi")
    x, y = make_data(32)
    names = []
    for _ in range(3):
        rt.forward_backward((x, y), mse)
        report = rt.step()
        names += [r.action.name for r in report.actions]
    # step 0 fires grow-out (memory usage 0 < 50%); slow needs a step time, so it fires at step 1;
    # then both are held (edge-triggered)
    assert names == ["scale_up_replicas", "adjust_gpu_memory_limit", "set_precision", "shrink_micro_batch", "alert"]
    assert rt.controller.micro_batch == 16 and rt.controller.effective_batch == 32
    assert alerts == ["steps are slow"]
    assert rt.precision == "float16"
    applied = {r.action.name: (r.applied, r.detail) for r in rt.actuators.history}
    # Nothing here can scale replicas, and the pool holds none of the model's memory (torch's CPU
    # tensors live outside it): both say so instead of claiming success, and change nothing.
    assert applied["scale_up_replicas"][0] is False and "no scheduler" in applied["scale_up_replicas"][1]
    assert applied["adjust_gpu_memory_limit"][0] is False and "holds none" in applied["adjust_gpu_memory_limit"][1]
    assert pool.limit == 48 * MiB
    assert all(applied[n][0] for n in ("set_precision", "shrink_micro_batch", "alert"))
    assert report.metrics["gpu_utilization"] == 0.1 and "pool.limit_bytes" in report.metrics
    counts = rt.policy_metrics()["actions"]
    assert counts[("scale_up_replicas", "false")] == 1 and counts[("shrink_micro_batch", "true")] == 1


def test_memory_limit_action_applies_to_a_pool_that_holds_the_model() -> None:
    pool = CachingPool("cpu")
    model = PoolBackedNet(pool)
    strategy = Strategy.from_yaml(
        """
strategy:
  name: cap
  trigger: {phase: initial}
  actions: [{adjust_gpu_memory_limit: "40Mi"}]
"""
    )
    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        strategy=strategy,
        pool=pool,
        precision_by_phase={},
        memory=MemoryConfig(capacity="64Mi", threads_by_phase=False),
    )
    x, y = make_data(32)
    rt.forward_backward((x, y), mse)
    (result,) = rt.step().actions
    assert result.applied and pool.limit == 40 * MiB, result.detail


def test_metrics_sink_and_the_monitor_policy_source() -> None:
    seen: list[StepReport] = []
    model = make_model()
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.1), hooks=Hooks(metrics_sink=seen.append))
    x, y = make_data(32)
    for _ in range(3):
        rt.forward_backward((x, y), mse)
        rt.step()
    assert [r.step for r in seen] == [0, 1, 2]
    assert seen[0].step_seconds is None and seen[1].step_seconds is not None and seen[1].step_seconds > 0
    assert rt.policy_metrics() == {
        "phase": "initial",
        "unstable": False,
        "micro_batch": 32,
        "accumulation": 1,
        "effective_batch": 32,
        "noise_scale": None,
        "steps": 3,
        "skipped_steps": 0,
        "ooms_recovered": 0,
        "actions": {},
    }


def test_bad_input() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model"):
        Runtime(object(), opt)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        Runtime(model, object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="precision_by_phase"):
        Runtime(model, opt, precision_by_phase={"fine_tuning": "fp8"})
    rt = Runtime(model, opt)
    with pytest.raises(RuntimeError, match="effective batch"):
        rt.step()
    x, y = make_data(8)
    with pytest.raises(TypeError, match="scalar"):
        rt.forward_backward((x, y), lambda m, b: (m(b[0]) - b[1]) ** 2)
    with pytest.raises(ValueError, match="empty"):
        rt.forward_backward((x[:0], y[:0]), mse)
    with pytest.raises(TypeError, match="batch"):
        rt.forward_backward("abc", mse)
    with pytest.raises(RuntimeError, match="no gradients"):
        rt.step()
    with pytest.raises(ValueError, match="precision"):
        rt.set_precision("int8")


class FakeCommState:
    """Stands in for ddp.TopKState.norms() on 4 ranks with known per-rank and averaged norms."""

    def norms(self) -> dict[str, float]:
        return {"local_sq_norm": 5.0, "mean_local_sq_norm": 5.0, "global_sq_norm": 2.0, "world_size": 4.0}


def test_noise_scale_comes_from_the_comm_state_on_several_ranks() -> None:
    from autoglm_rt.stats import NoiseScale

    model = make_model()
    rt = Runtime(model, torch.optim.SGD(model.parameters(), lr=0.0), comm_state=FakeCommState())
    x, y = make_data(32)
    ref = NoiseScale()
    for _ in range(3):
        rt.forward_backward((x, y), mse)
        report = rt.step()
        ref.update(5.0, 32, 2.0, 128)
    assert report.noise_scale == pytest.approx(ref.b_simple, rel=1e-12)


def test_goodput_mode_grows_the_batch_on_a_noisy_gradient_and_rescales_the_lr() -> None:
    # Labels are pure noise: the gradient noise scale is large, so a larger batch pays when each
    # step has a large fixed cost (simulated with a controlled clock).
    now = [0.0]
    model = make_model()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32 * 200, 8, generator=g)
    y = torch.randn(32 * 200, 1, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = Runtime(
        model,
        opt,
        precision_by_phase={},
        batch=BatchConfig(micro_batch=8, goodput=True, max_effective_batch=256),
        hooks=Hooks(clock=lambda: now[0]),
    )
    sizes = []

    def timed_mse(m: nn.Module, b: Any) -> torch.Tensor:
        now[0] += 0.01  # 10 ms per micro-batch
        return mse(m, b)

    for _, batch in rt.batches(loader(x, y, 32)):
        rt.forward_backward(batch, timed_mse)
        now[0] += 0.2  # a fixed 200 ms per step (optimizer, communication, data)
        report = rt.step()
        sizes.append(len(batch[0]))
    changes = [c for c in rt.controller.changes if c.reason == "goodput"]
    assert changes and rt.controller.effective_batch > 32
    assert report.noise_scale is not None and report.noise_scale > 32
    # batches() followed the controller: later batches have the new effective size
    # the loader's 6,400 samples end in a remainder smaller than the grown batch
    full, remainder = sizes[:-1], sizes[-1]
    assert full[0] == 32 and max(full) > 32 and set(full) <= {c.after.effective_batch for c in changes} | {32}
    assert full == sorted(full) and sum(sizes) == 6400 and remainder <= full[-1]
    expected = 0.1 * rt.controller.lr_factor(report.noise_scale)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    assert 0.1 < opt.param_groups[0]["lr"] <= 0.1 * rt.controller.effective_batch / 32


def test_memory_pressure_shrinks_then_a_raised_limit_lets_the_micro_batch_grow_back() -> None:
    pool = CachingPool("cpu")
    model = PoolBackedNet(pool)  # peak per micro-batch: 2 x 64 KiB per sample
    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        pool=pool,
        phase_detector=PhaseDetector(window=1000),
        precision_by_phase={},
        memory=MemoryConfig(
            limits={"initial": "4352Ki", "convergence": "4352Ki", "fine_tuning": "4352Ki"}, threads_by_phase=False
        ),
    )
    assert pool.limit == 4352 * 1024  # the starting phase's limit holds from construction
    x, y = make_data(32)
    micro = []
    for step in range(50):
        if step == 25:
            pool.set_limit("16Mi")  # memory freed elsewhere: a strategy action, another tenant leaving
        rt.forward_backward((x, y), mse)
        micro.append(rt.step().micro_batch)
    # 32 samples peak at 4 MiB = 94% of 4.25 MiB: halved at once, and not grown back into it
    assert micro[0] == 16 and set(micro[:25]) == {16}
    assert rt.controller.changes[0].reason == "pressure" and rt.ooms_recovered == 0
    # after the limit was raised: back to 32 once usage stayed low for grow_after steps
    assert micro[-1] == 32 and 25 <= micro.index(32) < 25 + rt.controller.grow_after
    assert all(r == 32 for r in (c.after.effective_batch for c in rt.controller.changes))
    model.release()


class WithOffset(nn.Module):
    """A parameter whose only use is ``offset.sum()``: autograd hands back an expanded gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_model()
        self.offset = nn.Parameter(torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.offset.sum()


@pytest.mark.parametrize("micro", [32, 8])
def test_expanded_gradients_are_accumulated_correctly(micro: int) -> None:
    x, y = make_data(32 * 4)
    model = WithOffset()
    ref = WithOffset()
    ref.load_state_dict(model.state_dict())
    ref.double()
    rt = Runtime(
        model, torch.optim.SGD(model.parameters(), lr=0.1), precision_by_phase={}, batch=BatchConfig(micro_batch=micro)
    )
    for _, batch in rt.batches(loader(x, y, 32)):
        rt.forward_backward(batch, mse)
        rt.step()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for xb, yb in loader(x.double(), y.double(), 32):
        opt.zero_grad()
        mse(ref, (xb, yb)).backward()
        opt.step()
    for p, r in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.double(), r, rtol=1e-5, atol=1e-6)


def test_step_time_target_is_held_by_the_thread_pid() -> None:
    # A plant whose step takes 1.2 s of work split over the threads: the target of 0.3 s needs
    # exactly 4 of the 8 allowed threads, and the PID should settle there (freeing the other 4).
    now = [0.0]
    applied: list[int] = []
    model = make_model()
    rt = Runtime(
        model,
        torch.optim.SGD(model.parameters(), lr=0.01),
        precision_by_phase={},
        threads=ThreadConfig(step_time_target=0.3, setter=applied.append, max_threads=8),
        hooks=Hooks(clock=lambda: now[0]),
    )
    x, y = make_data(16)
    times = []
    for _ in range(60):
        rt.forward_backward((x, y), mse)
        rt.step()
        step = 1.2 / rt.threads
        now[0] += step
        times.append(step)
    assert rt.threads == 4 and applied[-1] == 4
    assert times[-20:] == [pytest.approx(0.3)] * 20  # settled, no limit cycle
    assert all(1 <= n <= 8 for n in applied)
    with pytest.raises(ValueError, match="step_time_target"):
        Runtime(model, torch.optim.SGD(model.parameters(), lr=0.01), threads=ThreadConfig(step_time_target=0.0))
