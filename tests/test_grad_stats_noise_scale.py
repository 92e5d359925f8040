"""autoglm_rt.stats.NoiseScale on per-example gradients drawn from N(G, Sigma) with known G, Sigma."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoglm_rt import ops
from autoglm_rt.stats import NoiseScale, estimate
from tests.grad_stats_reference import noise_scale_truth


def make_problem(dim: int, b_simple: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """G with |G|^2 = 1 and a diagonal Sigma (uneven variances) with tr(Sigma) = b_simple."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(dim)
    g /= np.linalg.norm(g)
    sigma = rng.uniform(0.2, 2.0, size=dim)
    sigma *= b_simple / sigma.sum()
    return g, sigma


def test_ddp_style_estimate_lands_within_15_percent() -> None:
    # 8 ranks x 32 samples: per-rank gradients vs. the all-reduced one.
    g, sigma = make_problem(dim=500, b_simple=400.0, seed=0)
    truth = noise_scale_truth(g, sigma)
    rng = np.random.default_rng(1)
    ranks, local = 8, 32
    ns = NoiseScale(beta=0.99)
    for _ in range(600):
        # The mean of `local` per-example draws from N(G, Sigma) is N(G, Sigma / local).
        per_rank = g + rng.standard_normal((ranks, g.size)) * np.sqrt(sigma / local)
        local_sqnorm = float(np.mean(np.sum(per_rank**2, axis=1)))
        global_sqnorm = float(np.sum(per_rank.mean(axis=0) ** 2))
        ns.update(local_sqnorm, local, global_sqnorm, ranks * local)
    assert ns.updates == 600
    assert ns.b_simple is not None
    assert abs(ns.b_simple - truth) <= 0.15 * truth, (ns.b_simple, truth)
    assert ns.grad_sqnorm == pytest.approx(1.0, rel=0.15)
    assert ns.trace_cov == pytest.approx(float(sigma.sum()), rel=0.15)


def test_micro_batch_estimate_from_explicit_per_example_gradients() -> None:
    # One process, 4 micro-batches of 16 explicit per-example gradients, accumulated; squared
    # norms taken with grad_stats (float32 tensors), as the runtime does.
    g, sigma = make_problem(dim=200, b_simple=100.0, seed=2)
    truth = noise_scale_truth(g, sigma)
    rng = np.random.default_rng(3)
    micro, per_micro = 4, 16
    ns = NoiseScale(beta=0.98)
    for _ in range(500):
        examples = g + rng.standard_normal((micro, per_micro, g.size)) * np.sqrt(sigma)
        micro_grads = [m.mean(axis=0).astype(np.float32) for m in examples]
        accumulated = np.mean(micro_grads, axis=0).astype(np.float32)
        local = ops.grad_stats(micro_grads).sumsq.mean()
        global_ = ops.grad_stats([accumulated]).total.sumsq
        ns.update(float(local), per_micro, global_, micro * per_micro)
    assert ns.b_simple is not None and abs(ns.b_simple - truth) <= 0.15 * truth, (ns.b_simple, truth)


def test_single_estimates_are_unbiased() -> None:
    g, sigma = make_problem(dim=50, b_simple=30.0, seed=4)
    rng = np.random.default_rng(5)
    b, big = 4, 16
    g2, tr = [], []
    for _ in range(20_000):
        per = g + rng.standard_normal((big // b, g.size)) * np.sqrt(sigma / b)
        est = estimate(float(np.mean(np.sum(per**2, axis=1))), b, float(np.sum(per.mean(axis=0) ** 2)), big)
        g2.append(est.grad_sqnorm)
        tr.append(est.trace_cov)
    assert np.mean(g2) == pytest.approx(1.0, rel=0.05)
    assert np.mean(tr) == pytest.approx(float(sigma.sum()), rel=0.05)


def test_estimate_formulas_invert_the_expected_norms() -> None:
    # E|G_B|^2 = |G|^2 + tr(Sigma)/B exactly inverts.
    g2, tr, b, big = 2.5, 40.0, 8, 64
    est = estimate(g2 + tr / b, b, g2 + tr / big, big)
    assert est.grad_sqnorm == pytest.approx(g2) and est.trace_cov == pytest.approx(tr)


def test_bias_correction_makes_the_first_update_usable() -> None:
    ns = NoiseScale(beta=0.99)
    assert ns.b_simple is None and ns.updates == 0 and ns.grad_sqnorm is None and ns.gain(4) is None
    ns.update(2.0 + 40.0 / 8, 8, 2.0 + 40.0 / 64, 64)
    assert ns.updates == 1
    assert ns.grad_sqnorm == pytest.approx(2.0) and ns.trace_cov == pytest.approx(40.0)
    assert ns.b_simple == pytest.approx(20.0)


def test_b_simple_is_none_while_the_signal_estimate_is_not_positive() -> None:
    ns = NoiseScale(beta=0.0)
    ns.update(1.0, 8, 0.05, 64)  # |G|^2 estimate (64*0.05 - 8) / 56 < 0
    assert ns.updates == 1 and ns.grad_sqnorm is not None and ns.grad_sqnorm < 0
    assert ns.b_simple is None


def test_gain_is_adascale_ratio_between_one_and_scale() -> None:
    ns = NoiseScale(beta=0.0, base_batch=64)
    g2, tr = 1.0, 640.0  # B_simple = 640 = 10 x base batch
    ns.update(g2 + tr / 8, 8, g2 + tr / 64, 64)
    assert ns.gain(1) == pytest.approx(1.0)
    for scale in (2.0, 4.0, 16.0):
        expected = (tr / 64 + g2) / (tr / (64 * scale) + g2)
        assert ns.gain(scale) == pytest.approx(expected)
        assert 1.0 <= ns.gain(scale) <= scale  # type: ignore[operator]
    assert ns.gain(4) < ns.gain(16)  # type: ignore[operator]


def test_base_batch_defaults_to_first_global_batch() -> None:
    ns = NoiseScale()
    ns.update(3.0, 4, 1.0, 32)
    assert ns.base_batch == 32.0


def test_bad_updates_raise_and_change_nothing() -> None:
    ns = NoiseScale(beta=0.9)
    ns.update(5.0, 8, 2.0, 64)
    before = (ns.updates, ns.grad_sqnorm, ns.trace_cov)
    with pytest.raises(ValueError, match="global_batch"):
        ns.update(5.0, 8, 2.0, 8)
    with pytest.raises(ValueError, match="local_batch"):
        ns.update(5.0, 0, 2.0, 64)
    with pytest.raises(ValueError, match="local_sqnorm"):
        ns.update(float("nan"), 8, 2.0, 64)
    with pytest.raises(ValueError, match="global_sqnorm"):
        ns.update(5.0, 8, float("inf"), 64)
    with pytest.raises(ValueError, match="local_sqnorm"):
        ns.update(-1.0, 8, 2.0, 64)
    with pytest.raises(TypeError, match="local_sqnorm"):
        ns.update("big", 8, 2.0, 64)  # type: ignore[arg-type]
    assert (ns.updates, ns.grad_sqnorm, ns.trace_cov) == before


def test_constructor_and_gain_validate_arguments() -> None:
    with pytest.raises(ValueError, match="beta"):
        NoiseScale(beta=1.0)
    with pytest.raises(ValueError, match="base_batch"):
        NoiseScale(base_batch=0)
    with pytest.raises(ValueError, match="scale"):
        NoiseScale().gain(0.5)
    with pytest.raises(ValueError, match="scale"):
        NoiseScale().gain(math.inf)


def test_reset_forgets_updates() -> None:
    ns = NoiseScale()
    ns.update(5.0, 8, 2.0, 64)
    ns.reset()
    assert ns.updates == 0 and ns.b_simple is None
