"""TopKState's contracts (metrics, exact resume), regime-aware density, DGC momentum correction,
the fused sum of squares and aliasing checks of topk_compress."""

from __future__ import annotations

import functools
import math
import statistics
from typing import Any

import numpy as np
import pytest
import torch

from autoglm_rt import ddp, ops
from autoglm_rt.policy.compression import DensityController, DensityControllerConfig
from tests import ddp_compression_scenarios
from tests.ddp_harness import run_on_two_ranks
from tests.test_ddp_topk import FakeBucket

METRIC_KEYS = {
    "bytes_sent",
    "dense_bytes",
    "ratio",
    "density",
    "compressed_buckets",
    "dense_buckets",
    "residual_resets",
    "nonfinite_resets",
    "iterations",
}


# -- topk_compress: fused sum of squares, aliasing ------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 1), (1000, 10), (1 << 19, 500), (1 << 19, 1 << 18), (300_001, 3)])
def test_sq_norm_out_is_the_sum_of_squares_of_grad(dtype: torch.dtype, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n + k)
    grad = torch.randn(n, generator=gen).to(dtype)
    residual = torch.randn(n, generator=gen).to(dtype)
    sq = torch.full((1,), float("nan"), dtype=torch.float64)
    res_a, res_b = residual.clone(), residual.clone()
    values, indices = ops.topk_compress(grad, res_a, k, sq_norm_out=sq)
    ref = float(np.sum(grad.double().numpy() ** 2))
    assert sq.item() == pytest.approx(ref, rel=1e-12)
    # Asking for it changes nothing else.
    v2, i2 = ops.topk_compress(grad, res_b, k)
    assert torch.equal(values, v2) and torch.equal(indices, i2) and torch.equal(res_a, res_b)


def test_sq_norm_out_with_a_missed_bound_and_without_residual() -> None:
    n = 1 << 20
    g = torch.ones(n)
    g[::4096] = 5.0  # heavy ties: the sampled bound misses and the exact select takes over
    sq = torch.zeros(1, dtype=torch.float64)
    ops.topk_compress(g, torch.zeros(n), 1000, sq_norm_out=sq)
    assert sq.item() == float(g.double().square().sum())
    g[0] = float("inf")
    ops.topk_compress(g, None, 10, sq_norm_out=sq)
    assert sq.item() == float("inf")


def test_sq_norm_out_rejects_bad_buffers() -> None:
    g = torch.randn(100)
    with pytest.raises(TypeError, match="sq_norm_out: expected one float64 element"):
        ops.topk_compress(g, None, 5, sq_norm_out=torch.zeros(1))
    with pytest.raises(TypeError, match="sq_norm_out: expected one float64 element"):
        ops.topk_compress(g, None, 5, sq_norm_out=torch.zeros(2, dtype=torch.float64))


def test_aliased_or_overlapping_buffers_are_rejected_before_writing() -> None:
    g = torch.randn(1000)
    before = g.clone()
    with pytest.raises(ValueError, match="residual overlaps grad"):
        ops.topk_compress(g, g, 10)
    with pytest.raises(ValueError, match="residual overlaps grad"):
        ops.topk_compress(g[:500], g[250:750], 10)
    residual = torch.zeros(1000)
    with pytest.raises(ValueError, match="indices overlaps residual"):
        ops.topk_compress(g, residual, 10, indices_out=residual[990:].view(torch.int32))
    with pytest.raises(ValueError, match="values overlaps grad"):
        ops.topk_compress(g, residual, 10, values_out=g[5:15])
    message = torch.zeros(8 + 40 + 40, dtype=torch.uint8)
    with pytest.raises(ValueError, match="sq_norm overlaps indices"):
        ops.topk_compress(
            g, residual, 10, indices_out=message[:40].view(torch.int32), sq_norm_out=message[:8].view(torch.float64)
        )
    assert torch.equal(g, before) and torch.equal(residual, torch.zeros(1000))
    # Adjacent, non-overlapping views of one buffer (the hook's message) are fine.
    ops.topk_compress(
        g,
        residual,
        10,
        indices_out=message[8:48].view(torch.int32),
        values_out=message[48:].view(torch.float32),
        sq_norm_out=message[:8].view(torch.float64),
    )
    assert message[:8].view(torch.float64).item() == pytest.approx(float(g.double().square().sum()), rel=1e-12)


# -- controller -----------------------------------------------------------------------------------
def test_controller_config_rejects_bad_values() -> None:
    for kwargs in (
        {"floor": 0.0},
        {"ceiling": 1.5},
        {"floor": 0.5, "ceiling": 0.1},
        {"interval": 0},
        {"threshold": 0.0},
        {"threshold": float("nan")},
        {"critical_windows": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            DensityControllerConfig(**kwargs)  # type: ignore[arg-type]


def test_controller_follows_the_relative_norm_change() -> None:
    c = DensityController(DensityControllerConfig(floor=0.01, ceiling=0.2, interval=2, threshold=0.5))
    assert c.density == 0.2  # the first window is critical
    norms = [4.0, 4.0, 4.1, 3.9, 1.0, 1.0, 1.0, 1.0, float("nan"), 1.1, 1.0, 1.0]
    densities = []
    for n in norms:
        c.observe(n * n)
        densities.append(c.density)
    # Window means of |g|: 4, 4, 1 (change 0.75: critical), 1, 1.1 (nan ignored), 1.
    assert densities == [0.2, 0.01, 0.01, 0.01, 0.01, 0.2, 0.2, 0.01, 0.01, 0.01, 0.01, 0.01]
    c.mark_critical()
    c.observe(1.0)
    c.observe(1.0)
    assert c.density == 0.2
    restored = DensityController(c.config)
    restored.load_state_dict(c.state_dict())
    for n in (1.0, 9.0, 9.0, 9.0):
        assert restored.observe(n) == c.observe(n) and restored.density == c.density
    with pytest.raises(ValueError, match="state dict"):
        restored.load_state_dict({"critical": True})


# -- TopKState on one rank --------------------------------------------------------------------------
def test_adam_update_rejects_bad_settings() -> None:
    for bad in ({"beta1": 1.0}, {"beta2": -0.1}, {"beta1": True}, {"eps": 0.0}, {"eps": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ddp.AdamUpdate(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="variance"):
        ddp.AdamUpdate(variance="global")
    with pytest.raises(ValueError, match="momentum"):
        ddp.AdamUpdate(momentum="none")
    with pytest.raises(ValueError, match="frozen"):
        ddp.AdamUpdate(variance="local", momentum="global")
    with pytest.raises(TypeError, match="AdamUpdate"):
        ddp.TopKState(adam=0.9)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum=0"):
        ddp.TopKState(adam=ddp.AdamUpdate(), momentum=0.9)
    with pytest.raises(ValueError, match="error_feedback"):
        ddp.TopKState(adam=ddp.AdamUpdate(), error_feedback=False)
    with pytest.raises(ValueError, match="start_iter >= 1"):
        ddp.TopKState(adam=ddp.AdamUpdate(), start_iter=0)
    ddp.TopKState(adam=ddp.AdamUpdate(variance="local"), start_iter=0)  # local variance needs no start


def test_state_rejects_bad_momentum_and_controller() -> None:
    with pytest.raises(ValueError, match="momentum"):
        ddp.TopKState(momentum=1.0)
    with pytest.raises(ValueError, match="momentum"):
        ddp.TopKState(momentum=0.9, error_feedback=False)
    with pytest.raises(TypeError, match="controller"):
        ddp.TopKState(controller=0.1)  # type: ignore[arg-type]


@pytest.mark.distributed
@pytest.mark.usefixtures("single_rank_group")
def test_metrics_contract_and_state_round_trip() -> None:
    state = ddp.TopKState(density=0.01, start_iter=1, min_numel=100, momentum=0.5)
    assert set(state.metrics()) == METRIC_KEYS and state.metrics()["ratio"] == 1.0
    grads = [torch.randn(20_000, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    for g in grads[:3]:
        ddp.topk_hook(state, FakeBucket(g.clone(), 0, [(100, 200)])).wait()  # type: ignore[arg-type]
    m = state.metrics()
    assert set(m) == METRIC_KEYS
    assert m["ratio"] == state.dense_bytes / state.bytes_sent and m["iterations"] == 3 and m["density"] == 0.01
    assert m["compressed_buckets"] == 2 and m["dense_buckets"] == 1
    copy = ddp.TopKState(density=0.01, start_iter=1, min_numel=100, momentum=0.5)
    copy.load_state_dict(state.state_dict())
    assert copy.metrics() == m and copy.norms() == state.norms()
    for g in grads[3:]:
        a = ddp.topk_hook(state, FakeBucket(g.clone(), 0, [(100, 200)])).wait()  # type: ignore[arg-type]
        b = ddp.topk_hook(copy, FakeBucket(g.clone(), 0, [(100, 200)])).wait()  # type: ignore[arg-type]
        assert torch.equal(a, b)
    assert copy.metrics() == state.metrics()
    with pytest.raises(ValueError, match="state dict"):
        copy.load_state_dict({"iteration": 3})
    with pytest.raises(ValueError, match="density controller"):
        ddp.TopKState(controller=DensityController()).load_state_dict(state.state_dict())


@pytest.mark.distributed
@pytest.mark.usefixtures("single_rank_group")
def test_adam_update_never_divides_a_first_gradient_by_eps() -> None:
    """Entries with no gradient during the dense start (an unseen token's embedding row) take the
    mean frozen v of their parameter's measured entries, not eps: steps stay O(1), proportional
    to the gradient; a parameter with no measured entry takes the bucket's mean."""
    state = ddp.TopKState(density=1.0, start_iter=3, min_numel=0, adam=ddp.AdamUpdate())
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    g[:100] = 0  # unseen during the start, in the first parameter (200 entries)
    g[900:] = 0  # the whole last parameter unseen
    shapes = [(200,), (700,), (100,)]
    for _ in range(3):
        ddp.topk_hook(state, FakeBucket(g.clone(), 0, shapes)).wait()  # type: ignore[arg-type]
    g2 = g.clone()
    g2[:100] = torch.linspace(-1e-3, 1e-3, 100)
    g2[900:] = 2e-3
    out = ddp.topk_hook(state, FakeBucket(g2.clone(), 0, shapes)).wait()  # type: ignore[arg-type]
    # After 3 equal gradients v_hat = g^2: the first step after the start is u = m / denom
    # (0 there) + 0.1 * g / denom, over Adam's bias correction 1 - 0.9^4.
    scale = 0.1 / (1 - 0.9**4)
    first_rms = float(g[100:200].square().mean().sqrt())
    bucket_rms = float(g[100:900].square().mean().sqrt())
    assert torch.allclose(out[:100], scale * g2[:100] / first_rms, rtol=1e-4, atol=1e-7)
    assert torch.allclose(out[900:], torch.full((100,), scale * 2e-3 / bucket_rms), rtol=1e-4)
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) < 10


@pytest.mark.distributed
@pytest.mark.usefixtures("single_rank_group")
def test_adam_update_dense_bucket_after_the_start() -> None:
    """A bucket below min_numel stays dense after the start: it delivers Adam's momentum of the
    preconditioned gradient (one rank: no compression error) and the gradient's exact norm."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    state = ddp.TopKState(start_iter=1, min_numel=10**6, adam=ddp.AdamUpdate(beta1=b1, beta2=b2, eps=eps))
    g0 = torch.randn(500, generator=torch.Generator().manual_seed(1))
    g1 = torch.randn(500, generator=torch.Generator().manual_seed(2))
    out0 = ddp.topk_hook(state, FakeBucket(g0.clone(), 0, [(500,)])).wait()  # type: ignore[arg-type]
    m, v = (1 - b1) * g0.double(), (1 - b2) * g0.double() ** 2
    denom = (v / (1 - b2)).sqrt() + eps
    assert torch.allclose(out0.double(), m / (1 - b1) / denom, rtol=1e-4, atol=1e-6)  # AdamW's first step: ~sign(g)
    out1 = ddp.topk_hook(state, FakeBucket(g1.clone(), 0, [(500,)])).wait()  # type: ignore[arg-type]
    expected = (b1 * m / denom + (1 - b1) * g1.double() / denom) / (1 - b1**2)
    assert torch.allclose(out1.double(), expected, rtol=1e-4, atol=1e-6)
    norms = state.norms()
    assert norms is not None and norms["global_sq_norm"] == pytest.approx(float(g1.double().square().sum()))
    assert state.dense_buckets == 2 and state.compressed_buckets == 0


@pytest.mark.distributed
@pytest.mark.usefixtures("single_rank_group")
def test_local_sq_norm_comes_from_the_fused_kernel() -> None:
    state = ddp.TopKState(density=0.01, start_iter=0, min_numel=0)
    g = torch.randn(50_000, generator=torch.Generator().manual_seed(3))
    ddp.topk_hook(state, FakeBucket(g.clone(), 0, [(50_000,)])).wait()  # type: ignore[arg-type]
    norms = state.norms()
    assert norms is not None and norms["local_sq_norm"] == pytest.approx(float(g.double().square().sum()), rel=1e-12)


# -- two ranks ------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_resume_continues_bit_exactly() -> None:
    for r in run_on_two_ranks(ddp_compression_scenarios.resume, timeout=120):
        assert r["params_equal"] and r["residuals_equal"]
        assert r["metrics_full"] == r["metrics_resumed"]
        assert set(r["metrics_full"]) == METRIC_KEYS
        assert r["metrics_full"]["residual_resets"] == 0


@pytest.mark.distributed
def test_resume_with_adam_update_continues_bit_exactly() -> None:
    for r in run_on_two_ranks(functools.partial(ddp_compression_scenarios.resume, adam=True), timeout=120):
        assert r["params_equal"] and r["residuals_equal"], r
        assert r["metrics_full"] == r["metrics_resumed"]
        assert all(n > 0 for n in r["tables"]), r  # velocities and both moments were carried


@pytest.mark.distributed
def test_adam_update_equals_its_formula_step_by_step() -> None:
    """Every (variance, momentum) pair: frozen/local variance, local/global momentum."""
    by_rank = run_on_two_ranks(ddp_compression_scenarios.adam_reference_variants, timeout=180)
    assert set(by_rank[0]) == {f"{v}-{m}" for v, m in ddp_compression_scenarios.ADAM_VARIANTS}
    for variant in by_rank[0]:
        r0, r1 = by_rank[0][variant], by_rank[1][variant]
        assert r0["params"] == r1["params"], variant  # the ranks applied the same update
        _check_adam_reference(r0)
        _check_adam_reference(r1)


def _check_adam_reference(r: dict[str, Any]) -> None:
    worst, scale = r["worst"], r["scale"]
    assert scale > 0.1, r  # Adam's direction is O(1) per coordinate
    assert worst["start"] <= 1e-5 * scale and worst["compressed"] <= 1e-5 * scale, r
    assert worst["adamw_params"] <= 1e-6 and worst["params"] <= 1e-6, r  # the start is AdamW
    # The averaged gradient's squared norm, estimated from the shared-position sketch.
    assert r["norms"]["global_sq_norm"] == pytest.approx(r["sketch_sq"], rel=1e-6)
    assert 0.5 * r["true_sq"] < r["sketch_sq"] < 2 * r["true_sq"], r
    assert r["norms"]["local_sq_norm"] > 0


@pytest.mark.distributed
def test_density_choice_is_identical_on_every_rank_under_uneven_gradients() -> None:
    r0, r1 = run_on_two_ranks(ddp_compression_scenarios.consistency, timeout=120)
    assert r0 == r1
    assert r0[0] == 1.0 and {0.01, 0.1} <= set(r0)  # the dense start, then both regimes


@pytest.mark.distributed
def test_momentum_correction_equals_the_dgc_formula_step_by_step() -> None:
    for r in run_on_two_ranks(ddp_compression_scenarios.momentum_reference, timeout=120):
        assert r["exact"], r
        assert r["scale"] > 0


@pytest.mark.distributed
def test_regime_aware_density_keeps_dense_accuracy_on_real_text_over_seeds() -> None:
    runs, runs1 = run_on_two_ranks(functools.partial(ddp_compression_scenarios.char_accuracy, seeds=6), timeout=420)
    assert runs == runs1  # every rank holds the same models
    gaps = [r["regime_accuracy"] - r["dense_accuracy"] for r in runs]
    # One seed is one draw: the dense accuracy alone spreads 0.443-0.475 over these 6 seeds, and
    # seed 0 measured a -0.005 gap on an AMD EPYC host and -0.013 on an Intel Xeon one (float
    # paths differ). On the Xeon the gaps are -0.027..+0.006, mean -0.013 (benches/RESULTS.md).
    assert statistics.fmean(gaps) >= -0.02, runs
    assert min(r["ratio"] for r in runs) >= 20, runs  # 38.9x: the first window at 0.05, the rest at 0.01
    assert min(r["dense_accuracy"] for r in runs) > 0.3, runs  # the task is learnt at all (chance is < 0.1)
