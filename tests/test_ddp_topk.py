"""autoglm_rt.ddp.TopKState / topk_hook: schedule and state in one process, then real DDP on two
gloo ranks over 127.0.0.1 (spawned, bounded in time)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from autoglm_rt import ddp, ops
from tests import ddp_scenarios
from tests.ddp_harness import run_on_two_ranks


def test_state_rejects_bad_arguments() -> None:
    for kwargs, exc in [
        ({"density": 0.0}, ValueError),
        ({"density": 1.5}, ValueError),
        ({"density": True}, ValueError),
        ({"value_dtype": torch.float64}, TypeError),
        ({"start_iter": -1}, ValueError),
        ({"warmup": 1.5}, ValueError),
        ({"min_numel": -3}, ValueError),
        ({"warmup": 10, "warmup_start_density": 0.001}, ValueError),
    ]:
        with pytest.raises(exc, match=next(iter(kwargs))):
            ddp.TopKState(**kwargs)


def test_density_schedule_dense_start_then_geometric_warmup() -> None:
    state = ddp.TopKState(density=0.001, start_iter=3, warmup=4, warmup_start_density=0.25)
    assert [state.density_at(i) for i in range(3)] == [1.0, 1.0, 1.0]
    expected = [0.25 * (0.001 / 0.25) ** (s / 4) for s in range(4)]
    assert [state.density_at(3 + s) for s in range(4)] == pytest.approx(expected)
    assert state.density_at(7) == state.density_at(1000) == 0.001
    assert state.k_for(10_000, 1000) == 10 and state.k_for(10, 1000) == 1 and state.k_for(10, 0) == 10
    assert state.k_for(1001, 1000) == math.ceil(1.001)


class FakeBucket:
    """The parts of dist.GradBucket the hook uses."""

    def __init__(self, buffer: torch.Tensor, index: int, shapes: list[tuple[int, ...]], last: bool = True) -> None:
        self._buffer, self._index, self._last = buffer, index, last
        self._params = [torch.empty(s) for s in shapes]

    def buffer(self) -> torch.Tensor:
        return self._buffer

    def index(self) -> int:
        return self._index

    def parameters(self) -> list[torch.Tensor]:
        return self._params

    def is_last(self) -> bool:
        return self._last


@pytest.mark.distributed
@pytest.mark.usefixtures("single_rank_group")
def test_hook_error_feedback_and_layout_reset_on_one_rank() -> None:
    state = ddp.TopKState(density=0.01, start_iter=1, min_numel=100)
    grads = [torch.randn(20_000, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    # Iteration 0: dense allreduce (world 1: the gradient itself), no residual yet.
    out = ddp.topk_hook(state, FakeBucket(grads[0].clone(), 0, [(100, 200)])).wait()  # type: ignore[arg-type]
    assert torch.equal(out, grads[0]) and state.dense_buckets == 1 and not state._residuals
    # Iterations 1, 2: compressed; sent + kept == gradient + previous residual, exactly.
    previous = torch.zeros(20_000)
    for it in (1, 2):
        out = ddp.topk_hook(state, FakeBucket(grads[it].clone(), 0, [(100, 200)])).wait()  # type: ignore[arg-type]
        residual = state._residuals[0].tensor
        assert int((out != 0).sum()) == 200
        assert torch.equal(out + residual, grads[it] + previous)
        previous = residual.clone()
    assert state.residual_resets == 0 and state.bucket_density[0] == 0.01
    # Same index, new layout (DDP rebuilt its buckets): the old residual must not leak in.
    out = ddp.topk_hook(state, FakeBucket(grads[3].clone(), 0, [(200, 100)])).wait()  # type: ignore[arg-type]
    assert state.residual_resets == 1
    assert torch.equal(out + state._residuals[0].tensor, grads[3])
    assert state.iter == 4
    # Counted bytes: one dense bucket (+ its 8-byte norm), three messages of k values, k indices, 1 norm.
    assert state.bytes_sent == (20_000 * 4 + 8) + 3 * (200 * 4 + 200 * 4 + 8)
    assert state.dense_bytes == 4 * 20_000 * 4
    assert state.metrics()["ratio"] == pytest.approx(state.dense_bytes / state.bytes_sent)


@pytest.mark.distributed
@pytest.mark.usefixtures("single_rank_group")
def test_nonfinite_bucket_is_sent_and_its_residual_cleared() -> None:
    state = ddp.TopKState(density=0.01, start_iter=0, min_numel=0, value_dtype=torch.float16)
    grad = torch.randn(10_000)
    ddp.topk_hook(state, FakeBucket(grad.clone(), 0, [(10_000,)])).wait()  # type: ignore[arg-type]
    assert state.nonfinite_resets == 0 and bool(state._residuals[0].tensor.abs().sum() > 0)
    bad = grad.clone()
    bad[[3, 4000]] = float("nan")
    out = ddp.topk_hook(state, FakeBucket(bad, 0, [(10_000,)])).wait()  # type: ignore[arg-type]
    assert torch.isnan(out[[3, 4000]]).all()  # the optimizer (or a GradScaler) sees it
    assert state.nonfinite_resets == 1 and torch.equal(state._residuals[0].tensor, torch.zeros(10_000))
    out = ddp.topk_hook(state, FakeBucket(grad.clone(), 0, [(10_000,)])).wait()  # type: ignore[arg-type]
    assert torch.isfinite(out).all() and state.nonfinite_resets == 1
    # float16 on the wire: values are the float16-rounded accumulated gradient.
    values, indices = ops.topk_compress(grad, None, 100, value_dtype=torch.float16)
    assert torch.equal(out[indices.long()], values.float())


@pytest.fixture(scope="module")
def two_rank_hooks() -> list[dict[str, Any]]:
    return run_on_two_ranks(ddp_scenarios.hooks, timeout=150)


@pytest.mark.distributed
def test_density_one_matches_allreduce_hook(two_rank_hooks: list[dict[str, Any]]) -> None:
    for r in two_rank_hooks:
        assert r["density1_buckets_per_step"] >= 2  # several buckets were exercised
        assert r["density1_dense_buckets"] == 0 and r["density1_compressed_buckets"] >= 4
        assert r["density1_max_diff"] <= 1e-7


@pytest.mark.distributed
def test_byte_counters_equal_bytes_passed_to_collectives(two_rank_hooks: list[dict[str, Any]]) -> None:
    for r in two_rank_hooks:
        assert r["counted_bytes"] == r["recorded_bytes"] > 0
        assert r["dense_buckets"] > 0 and r["compressed_buckets"] > 0
        assert all(0.01 <= d < 0.0101 for d in r["bucket_density"].values())
        assert r["iter"] == 5


@pytest.mark.distributed
def test_norms_for_the_noise_scale(two_rank_hooks: list[dict[str, Any]]) -> None:
    r0, r1 = two_rank_hooks
    for step, (n0, n1) in enumerate(zip(r0["norms"], r1["norms"], strict=True)):
        assert n0["mean_local_sq_norm"] == pytest.approx((n0["local_sq_norm"] + n1["local_sq_norm"]) / 2, rel=1e-12)
        assert n0["mean_local_sq_norm"] == n1["mean_local_sq_norm"]
        assert n0["global_sq_norm"] == pytest.approx(n0["grad_sq_norm"], rel=1e-5), step
        assert n0["world_size"] == 2.0


@pytest.mark.distributed
def test_nonfinite_bucket_on_one_rank_does_not_hang(two_rank_hooks: list[dict[str, Any]]) -> None:
    r0, r1 = two_rank_hooks
    assert r0["nan_finite_per_step"] == r1["nan_finite_per_step"] == [True, False, True]
    assert r0["nan_resets"] == 0 and r1["nan_resets"] >= 1
    assert r0["nan_residuals_finite"] and r1["nan_residuals_finite"]


@pytest.mark.distributed
def test_training_with_error_feedback_tracks_dense() -> None:
    r0, r1 = run_on_two_ranks(ddp_scenarios.training, timeout=150)
    assert r0 == r1  # every rank holds the same model
    assert r0["topk_ef"] <= 1.05 * r0["dense"], r0
    assert r0["topk_no_ef"] >= 1.5 * r0["topk_ef"], r0
