"""The CUDA twin of topk_compress / topk_decompress against the numpy/torch reference, on the cases
the CUDA code has its own paths for: every grad/value dtype with and without error feedback, the
radix select's early stop (a bin taken whole) and its last digit (exact ties), NaN/Inf keys, k at
both ends, many tiles, int64 indices at 2^31 elements, and no host synchronisation in compress.
All skipped without a usable CUDA device (compiled here, run by benches/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_rt import ops
from tests.topk_reference import decompress_reference, topk_reference

pytestmark = pytest.mark.cuda

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_on_cuda(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    k: int,
    value_dtype: torch.dtype = torch.float32,
    index_dtype: torch.dtype | None = None,
) -> None:
    """Runs the CUDA kernel and compares indices, values and residual bit for bit."""
    chosen, ref_values, ref_after = topk_reference(grad, residual, k, value_dtype)
    res = None if residual is None else residual.cuda()
    indices_out = None if index_dtype is None else torch.empty(k, dtype=index_dtype, device="cuda")
    values, indices = ops.topk_compress(grad.cuda(), res, k, value_dtype=value_dtype, indices_out=indices_out)
    assert values.device.type == "cuda" and indices.device.type == "cuda"
    np.testing.assert_array_equal(indices.cpu().numpy(), chosen)
    torch.testing.assert_close(values.cpu(), ref_values, rtol=0, atol=0, equal_nan=True)
    if res is not None:
        torch.testing.assert_close(res.cpu().reshape(-1), ref_after, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("feedback", [False, True])
def test_dtypes_with_and_without_error_feedback(dtype: torch.dtype, value_dtype: torch.dtype, feedback: bool) -> None:
    gen = torch.Generator().manual_seed(3)
    n = 300_007  # 73 full tiles of 4096 and a ragged last one
    grad = torch.randn(n, generator=gen).to(dtype)
    residual = (0.3 * torch.randn(n, generator=gen)).to(dtype) if feedback else None
    for k in (1, 97, n // 100, n // 3):
        check_on_cuda(grad, None if residual is None else residual.clone(), k, value_dtype)


@pytest.mark.parametrize("n", [1, 2, 7, 4095, 4096, 4097, 65_537])
def test_small_and_tile_boundary_sizes_with_every_k_extreme(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=gen)
    residual = torch.randn(n, generator=gen)
    for k in sorted({1, max(1, n // 2), n}):
        check_on_cuda(grad, residual.clone(), k)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_views_at_odd_offsets(dtype: torch.dtype) -> None:
    # Contiguous views that start 1..3 elements into their storage: no 16-byte alignment to rely on.
    gen = torch.Generator().manual_seed(23)
    big_grad = torch.randn(100_003, generator=gen).to(dtype)
    big_res = torch.randn(100_003, generator=gen).to(dtype)
    for off in (1, 2, 3):
        grad, residual = big_grad[off:], big_res[off:].clone()
        chosen, ref_values, ref_after = topk_reference(grad, residual, 1234)
        g = big_grad.cuda()[off:]
        r = big_res.cuda()[off:]
        values, indices = ops.topk_compress(g, r, 1234)
        np.testing.assert_array_equal(indices.cpu().numpy(), chosen)
        assert torch.equal(values.cpu(), ref_values)
        assert torch.equal(r.cpu(), ref_after)


def test_all_equal_input_takes_a_bin_whole_or_the_lowest_indices() -> None:
    n = 100_000
    grad = torch.full((n,), 0.5)
    for k in (1, 4096, n - 1, n):  # the top bin holds every entry: ties to the lowest indices
        check_on_cuda(grad, None, k)


def test_ties_decided_on_the_last_digit() -> None:
    # Magnitudes that share their top 22 bits, so the select needs all three digits, with many
    # exact ties at the threshold spread over many tiles.
    gen = torch.Generator().manual_seed(5)
    n = 1_000_003
    base = torch.full((n,), 1.0)
    bits = base.view(torch.int32) + torch.randint(0, 8, (n,), generator=gen, dtype=torch.int32)
    grad = bits.view(torch.float32) * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    for k in (10, 10_000, 300_000):
        check_on_cuda(grad, None, k)


def test_nan_and_inf_rank_above_every_finite_value() -> None:
    gen = torch.Generator().manual_seed(7)
    n = 50_000
    grad = torch.randn(n, generator=gen)
    grad[[5, 40_000]] = float("nan")
    grad[[6, 49_999]] = float("inf")
    grad[7] = -float("inf")
    grad[100:4196] = 0.0
    for k in (1, 2, 5, 6, 1000):
        check_on_cuda(grad, None, k)
    residual = torch.zeros(n)
    residual[9] = float("nan")  # NaN from the accumulation itself
    check_on_cuda(grad, residual, 8)


def test_preallocated_int64_indices() -> None:
    gen = torch.Generator().manual_seed(9)
    grad = torch.randn(200_000, generator=gen)
    check_on_cuda(grad, torch.randn(200_000, generator=gen), 2000, index_dtype=torch.int64)


def test_int64_indices_beyond_two_to_the_31() -> None:
    # 2^31 + 1000 float16 zeros (4 GiB) with a few entries planted around the int32 boundary: the
    # answer is known without a host-side reference over 2^31 elements.
    n = 2**31 + 1000
    grad = torch.zeros(n, dtype=torch.float16, device="cuda")
    planted = torch.tensor([5, 2**31 - 1, 2**31, 2**31 + 999], dtype=torch.int64)
    grad[planted.cuda()] = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float16, device="cuda")
    values, indices = ops.topk_compress(grad, None, 4)
    assert indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), planted)
    assert torch.equal(values.cpu(), torch.tensor([1.0, -2.0, 3.0, -4.0]))
    with pytest.raises(TypeError, match="int64"):
        ops.topk_compress(grad, None, 4, indices_out=torch.empty(4, dtype=torch.int32, device="cuda"))


def test_compress_never_waits_for_the_stream() -> None:
    gen = torch.Generator().manual_seed(11)
    grad = torch.randn(1_000_000, generator=gen)
    residual = torch.randn(1_000_000, generator=gen)
    chosen, ref_values, ref_after = topk_reference(grad, residual, 1000)
    g, r = grad.cuda(), residual.cuda()
    # Warm up on a copy: with lazy module loading the first launch of a kernel may synchronise.
    ops.topk_compress(g, r.clone(), 1000)
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time queued ahead of the kernels
    values, indices = ops.topk_compress(g, r, 1000)
    assert not stream.query(), "topk_compress waited for the stream: it must only enqueue work"
    torch.cuda.synchronize()
    np.testing.assert_array_equal(indices.cpu().numpy(), chosen)
    assert torch.equal(values.cpu(), ref_values)
    assert torch.equal(r.cpu(), ref_after)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decompress_accumulates_duplicates(out_dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(13)
    n, m = 10_000, 10_000
    # Integers in [-2, 2] scaled by 0.5, about ten per target: every partial sum is a multiple of
    # 0.5 below 64 in magnitude, exact even in bfloat16 (8 significant bits), so the atomics'
    # order cannot change the result.
    values = torch.randint(-2, 3, (m,), generator=gen).float()
    indices = torch.randint(0, n // 10, (m,), generator=gen).to(index_dtype)  # many duplicates
    out = torch.zeros(n, dtype=out_dtype)
    expected = decompress_reference(values, indices, out, 0.5)
    got = ops.topk_decompress(values.cuda(), indices.cuda(), out.cuda(), scale=0.5)
    np.testing.assert_array_equal(got.cpu().double().numpy(), expected)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value_dtype", FLOAT_DTYPES)
def test_decompress_rounds_each_update_once_like_the_cpu(out_dtype: torch.dtype, value_dtype: torch.dtype) -> None:
    # Distinct indices (no order to depend on) and values whose scaled sums are not representable
    # in 16 bits: a native half/bfloat16 atomicAdd would round scale*v and then the sum (two
    # roundings); the documented rule, and the CPU twin, round the float32 sum once.
    gen = torch.Generator().manual_seed(19)
    n, m = 200_000, 50_000
    out = torch.randn(n, generator=gen).to(out_dtype)
    values = torch.randn(m, generator=gen).to(value_dtype)
    indices = torch.randperm(n, generator=gen)[:m].to(torch.int32)
    cpu = ops.topk_decompress(values, indices, out.clone(), scale=0.3)
    gpu = ops.topk_decompress(values.cuda(), indices.cuda(), out.cuda(), scale=0.3)
    assert torch.equal(gpu.cpu(), cpu)


def test_decompress_rejects_an_out_of_range_index_and_leaves_out_unchanged() -> None:
    out = torch.arange(100, dtype=torch.float32, device="cuda")
    values = torch.ones(3, device="cuda")
    for bad in ([0, 100, 1], [-1, 0, 1]):
        indices = torch.tensor(bad, dtype=torch.int32, device="cuda")
        with pytest.raises(ValueError, match="outside out"):
            ops.topk_decompress(values, indices, out)
        assert torch.equal(out.cpu(), torch.arange(100, dtype=torch.float32))


def test_round_trip_identity_on_cuda() -> None:
    # decompress(compress(g + r)) + r_after == g + r_before, the error-feedback identity.
    gen = torch.Generator().manual_seed(17)
    grad = torch.randn(500_000, generator=gen).cuda()
    residual = torch.randn(500_000, generator=gen).cuda()
    before = grad + residual
    values, indices = ops.topk_compress(grad, residual, 5000)
    dense = ops.topk_decompress(values, indices, torch.zeros_like(grad))
    assert torch.equal(dense + residual, before)


def test_decompress_unchecked_skips_bad_indices_and_never_waits() -> None:
    gen = torch.Generator().manual_seed(23)
    n, m = 100_000, 20_000
    values = torch.randn(m, generator=gen)
    indices = torch.randperm(n, generator=gen)[:m].to(torch.int32)
    indices[::1000] = n + 5  # out of range: skipped
    indices[1::1000] = -3
    valid = (indices >= 0) & (indices < n)
    expected = ops.topk_decompress(values[valid], indices[valid], torch.zeros(n), scale=0.5)
    v, i, out = values.cuda(), indices.cuda(), torch.zeros(n, device="cuda")
    ops.topk_decompress(v, i, out.clone(), scale=0.5, check_indices=False)  # warm-up (lazy loading)
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    ops.topk_decompress(v, i, out, scale=0.5, check_indices=False)
    assert not stream.query(), "topk_decompress(check_indices=False) waited for the stream"
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n", [1, 4095, 4097, 3_000_001])
def test_fused_sq_norm_matches_float64_and_changes_nothing_else(dtype: torch.dtype, n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=gen).to(dtype)
    residual = torch.randn(n, generator=gen).to(dtype)
    k = max(1, n // 100)
    sq = torch.full((1,), float("nan"), dtype=torch.float64, device="cuda")
    res_a, res_b = residual.cuda(), residual.cuda()
    va, ia = ops.topk_compress(grad.cuda(), res_a, k, sq_norm_out=sq)
    vb, ib = ops.topk_compress(grad.cuda(), res_b, k)
    # Per-block float64 sums added by atomics: order varies, so not bit-exact.
    assert sq.item() == pytest.approx(float(grad.double().square().sum()), rel=1e-12)
    assert torch.equal(va, vb) and torch.equal(ia, ib) and torch.equal(res_a, res_b)
