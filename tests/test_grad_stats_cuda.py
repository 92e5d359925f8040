"""The CUDA grad_stats against the float64 reference, on the cases its kernels have their own paths
for: 16-byte vector loads and the scalar fallback for views that are not 16-byte aligned (every
dtype), chunk boundaries, chunks that start with or hold only non-finite values (the M2 shift
search), a mean far from zero, more tensors than one launch batch, an explicit stream, and no host
synchronisation. All skipped without a usable CUDA device (run by benches/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from autoglm_rt import ops
from tests.test_grad_stats import check, randn

pytestmark = pytest.mark.cuda

CHUNK = 1 << 16  # elements per block of the partial kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_misaligned_views_take_the_scalar_path_and_match(dtype: torch.dtype) -> None:
    base = randn(3 * CHUNK + 64, dtype, seed=1).cuda()
    # Contiguous views at every offset 0..8: offsets that break 16-byte alignment use the scalar
    # loads, the others the vector loads; lengths straddle chunk boundaries and vector tails.
    views = [base[off : off + n] for off in range(9) for n in (CHUNK - 1, CHUNK + 5, 2 * CHUNK + 7)]
    assert any(v.data_ptr() % 16 for v in views) and any(v.data_ptr() % 16 == 0 for v in views)
    stats = ops.grad_stats(views)
    check([v.cpu() for v in views], ops.GradStats(stats.table.cpu().numpy()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_values_in_every_position_of_a_chunk(dtype: torch.dtype) -> None:
    n = 3 * CHUNK
    leading = randn(n, dtype, seed=2)
    leading[: CHUNK + 100] = float("nan")  # chunk 0 all NaN, chunk 1 starts with 100 NaNs
    leading[CHUNK + 200] = float("inf")
    leading[-1] = -float("inf")
    only_inf = torch.full((CHUNK + 3,), float("inf"), dtype=dtype)
    only_nan = torch.full((5,), float("nan"), dtype=dtype)
    tensors = [leading, only_inf, only_nan, randn(777, dtype, seed=3)]
    stats = ops.grad_stats([t.cuda() for t in tensors])
    check(tensors, ops.GradStats(stats.table.cpu().numpy()))
    assert torch.isnan(stats.mean[1]) and torch.isnan(stats.var[2]) and stats.maxabs[1] == 0


def test_far_from_zero_mean_keeps_variance_exact() -> None:
    tensors = [randn(n, seed=n, loc=1e4, scale=1e-2) for n in (1000, CHUNK + 1, 5 * CHUNK)]
    stats = ops.grad_stats([t.cuda() for t in tensors])
    check(tensors, ops.GradStats(stats.table.cpu().numpy()))


def test_more_tensors_than_one_launch_batch_with_empty_ones() -> None:
    # 1024 tensors per launch: 2500 tensors, empty ones at the batch edges and in between.
    sizes = [(i * 37) % 300 for i in range(2500)]
    sizes[0] = sizes[1023] = sizes[1024] = sizes[2047] = sizes[-1] = 0
    sizes[500] = 2 * CHUNK + 1
    tensors = [randn(n, seed=i) for i, n in enumerate(sizes)]
    stats = ops.grad_stats([t.cuda() for t in tensors])
    check(tensors, ops.GradStats(stats.table.cpu().numpy()))


def test_explicit_stream_as_object_and_as_handle() -> None:
    tensors = [randn(n, seed=n) for n in (10, CHUNK + 9, 123_457)]
    on_device = [t.cuda() for t in tensors]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were written on the current stream
    for stream in (side, side.cuda_stream):
        stats = ops.grad_stats(on_device, stream=stream)
        side.synchronize()
        check(tensors, ops.GradStats(stats.table.cpu().numpy()))


def test_never_waits_for_the_stream_and_is_deterministic() -> None:
    tensors = [randn(n, seed=n) for n in (3, 70_000, 1_000_003)]
    on_device = [t.cuda() for t in tensors]
    first = ops.grad_stats(on_device).table.clone()  # also loads the kernels (lazy loading may sync)
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the kernels
    stats = ops.grad_stats(on_device)
    total = stats.total.sumsq  # a device tensor: reading .total must not synchronise either
    assert not stream.query(), "grad_stats waited for the stream: it must only enqueue work"
    torch.cuda.synchronize()
    assert torch.equal(stats.table, first)
    assert float(total) == float(first[-1, 3])
    check(tensors, ops.GradStats(stats.table.cpu().numpy()))
