"""autoglm_rt.ops.topk_compress / topk_decompress against the numpy/torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoglm_rt import ops
from tests.topk_reference import decompress_reference, topk_reference

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_against_reference(
    grad: torch.Tensor, residual: torch.Tensor | None, k: int, value_dtype: torch.dtype = torch.float32
) -> None:
    chosen, ref_values, ref_after = topk_reference(grad, residual, k, value_dtype)
    res = None if residual is None else residual.clone()
    values, indices = ops.topk_compress(grad, res, k, value_dtype=value_dtype)
    assert values.dtype == value_dtype and values.shape == (k,)
    assert indices.dtype == torch.int32
    np.testing.assert_array_equal(indices.numpy(), chosen)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=0, equal_nan=True)
    if res is not None:
        torch.testing.assert_close(res.reshape(-1), ref_after, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_random_sizes_and_k_match_reference(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1234)
    for n in [1, 2, 3, 17, 1000, 4099, 70_001, 300_007]:
        for k in sorted({1, 2, max(1, n // 100), max(1, n // 3), n}):
            if k > n:
                continue
            g = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
            r = torch.from_numpy((0.3 * rng.standard_normal(n)).astype(np.float32)).to(dtype)
            check_against_reference(g, r, k)


@pytest.mark.parametrize("value_dtype", FLOAT_DTYPES)
def test_value_dtypes(value_dtype: torch.dtype) -> None:
    g = torch.randn(50_000, generator=torch.Generator().manual_seed(3)) * 1e3
    check_against_reference(g, torch.randn(50_000), 777, value_dtype)


def test_every_k_on_a_small_tensor_with_ties() -> None:
    g = torch.tensor([1.0, -3.0, 3.0, 0.0, -0.0, 2.0, -2.0, 3.0, 1.0, 2.0])
    for k in range(1, g.numel() + 1):
        check_against_reference(g, None, k)
        check_against_reference(g, torch.zeros_like(g), k)


def test_heavy_ties_take_lowest_indices() -> None:
    # Integer magnitudes in a tiny range: thousands of ties at the threshold, across chunks.
    rng = np.random.default_rng(7)
    g = torch.from_numpy(rng.integers(-4, 5, size=500_000).astype(np.float32))
    for k in [1, 1000, 123_457, 499_999]:
        check_against_reference(g, None, k)


def test_all_equal_input_selects_first_k() -> None:
    g = torch.full((262_145,), -0.5)
    residual = torch.zeros_like(g)
    values, indices = ops.topk_compress(g, residual, 1000)
    np.testing.assert_array_equal(indices.numpy(), np.arange(1000))
    assert torch.equal(values, torch.full((1000,), -0.5))
    assert torch.equal(residual[:1000], torch.zeros(1000)) and torch.equal(residual[1000:], g[1000:])


def test_nan_and_inf_rank_above_finite() -> None:
    g = torch.randn(100_000, generator=torch.Generator().manual_seed(5))
    g[[10, 99_000]] = float("nan")
    g[[5, 500]] = float("inf")
    g[7] = float("-inf")
    values, indices = ops.topk_compress(g, None, 5)
    assert indices.tolist() == [5, 7, 10, 500, 99_000]
    assert values[[0, 3]].tolist() == [float("inf")] * 2 and values[1].item() == float("-inf")
    assert torch.isnan(values[[2, 4]]).all()
    check_against_reference(g, torch.randn(100_000), 1000)


def test_float16_values_overflow_to_inf() -> None:
    g = torch.tensor([1e5, -2e5, 1.0])
    values, _ = ops.topk_compress(g, None, 2, value_dtype=torch.float16)
    assert values.tolist() == [float("inf"), float("-inf")]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_error_feedback_identity(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    g = torch.randn(200_003, generator=gen).to(dtype)
    residual = (0.1 * torch.randn(200_003, generator=gen)).to(dtype)
    acc = (g.float() + residual.float()).to(dtype)
    values, indices = ops.topk_compress(g, residual, 2000, value_dtype=dtype)
    dense = ops.topk_decompress(values, indices, torch.zeros_like(g))
    assert torch.equal(dense + residual, acc)  # disjoint supports: exact
    assert int((residual != 0).sum()) <= 200_003 - 2000


def test_no_residual_leaves_grad_untouched() -> None:
    g = torch.randn(10_000)
    before = g.clone()
    check_against_reference(g, None, 100)
    assert torch.equal(g, before)


def test_outputs_can_be_preallocated_and_int64() -> None:
    g = torch.randn(4, 1000)  # any shape: flattened
    values = torch.empty(30)
    indices = torch.empty(30, dtype=torch.int64)
    v, i = ops.topk_compress(g, None, 30, values_out=values, indices_out=indices)
    assert v is values and i is indices
    chosen, ref_values, _ = topk_reference(g, None, 30)
    np.testing.assert_array_equal(i.numpy(), chosen)
    assert torch.equal(v, ref_values)


def test_deterministic_across_thread_counts() -> None:
    import autoglm_rt

    g = torch.randn(1_000_000, generator=torch.Generator().manual_seed(2))
    old = autoglm_rt.num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            autoglm_rt.set_num_threads(threads)
            results.append(ops.topk_compress(g, None, 10_000))
    finally:
        autoglm_rt.set_num_threads(old)
    for v, i in results[1:]:
        assert torch.equal(v, results[0][0]) and torch.equal(i, results[0][1])


@pytest.mark.parametrize("k", [0, -1, 11])
def test_k_out_of_range_is_rejected(k: int) -> None:
    residual = torch.ones(10)
    with pytest.raises(ValueError, match="k"):
        ops.topk_compress(torch.ones(10), residual, k)
    assert torch.equal(residual, torch.ones(10))


def test_bad_input_is_rejected_before_anything_changes() -> None:
    g = torch.randn(100)
    residual = torch.randn(100)
    keep = residual.clone()
    cases: list[tuple[type[Exception], str, dict[str, object]]] = [
        (TypeError, "residual", {"residual": residual.half()}),
        (ValueError, "residual", {"residual": torch.randn(99)}),
        (TypeError, "grad", {"grad": torch.ones(100, dtype=torch.int32)}),
        (TypeError, "contiguous", {"grad": torch.randn(200)[::2]}),
        (TypeError, "grad", {"grad": np.ones(100, dtype=np.float32)}),
        (TypeError, "k", {"k": 2.0}),
        (TypeError, "k", {"k": True}),
        (TypeError, "value_dtype", {"value_dtype": torch.float64}),
        (ValueError, "k=5", {"values_out": torch.empty(4)}),
        (TypeError, "indices", {"indices_out": torch.empty(5, dtype=torch.float32)}),
        (TypeError, "values", {"values_out": torch.empty(5, dtype=torch.int32)}),
    ]
    for exc, match, override in cases:
        kwargs: dict[str, object] = {"grad": g, "residual": residual, "k": 5}
        kwargs.update(override)
        extra = {key: kwargs.pop(key) for key in ("value_dtype", "values_out", "indices_out") if key in kwargs}
        with pytest.raises(exc, match=match):
            ops.topk_compress(kwargs["grad"], kwargs["residual"], kwargs["k"], **extra)  # type: ignore[arg-type]
        assert torch.equal(residual, keep), override


def test_empty_grad_is_rejected() -> None:
    with pytest.raises(ValueError, match="k"):
        ops.topk_compress(torch.empty(0), None, 1)


@pytest.mark.parametrize("out_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_decompress_accumulates_duplicates(out_dtype: torch.dtype, index_dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    out = torch.randn(5000, generator=gen).to(out_dtype)
    indices = torch.randint(0, 5000, (200_000,), generator=gen, dtype=index_dtype)  # many duplicates
    values = torch.randn(200_000, generator=gen)
    ref = decompress_reference(values, indices, out, 0.5)
    ops.topk_decompress(values, indices, out, scale=0.5)
    tol = {torch.float32: 1e-4, torch.float16: 0.5, torch.bfloat16: 4.0}[out_dtype]
    np.testing.assert_allclose(out.double().numpy(), ref, atol=tol, rtol=1e-2)


def test_decompress_is_exact_and_deterministic_on_cpu() -> None:
    gen = torch.Generator().manual_seed(9)
    indices = torch.randint(0, 1000, (300_000,), generator=gen, dtype=torch.int32)
    values = torch.randn(300_000, generator=gen)
    sequential = np.zeros(1000, dtype=np.float32)
    np.add.at(sequential, indices.numpy(), values.numpy())  # unbuffered, float32, in order
    out = ops.topk_decompress(values, indices, torch.zeros(1000))
    np.testing.assert_array_equal(out.numpy(), sequential)


def test_decompress_rejects_out_of_range_and_changes_nothing() -> None:
    out = torch.ones(10)
    for bad in (10, -1):
        indices = torch.tensor([1, 2, bad, 3], dtype=torch.int32)
        with pytest.raises(ValueError, match="outside out"):
            ops.topk_decompress(torch.ones(4), indices, out)
        assert torch.equal(out, torch.ones(10))
    with pytest.raises(ValueError, match="elements"):
        ops.topk_decompress(torch.ones(3), torch.zeros(4, dtype=torch.int32), out)
    with pytest.raises(TypeError, match="indices"):
        ops.topk_decompress(torch.ones(4), torch.zeros(4), out)
    with pytest.raises(TypeError, match="scale"):
        ops.topk_decompress(torch.ones(4), torch.zeros(4, dtype=torch.int32), out, scale="2")  # type: ignore[arg-type]


def test_device_twins_agree(device: str) -> None:
    gen = torch.Generator().manual_seed(21)
    g = torch.randn(1_000_003, generator=gen)
    g[::1000] = 2.0  # ties at a large magnitude
    residual = 0.5 * torch.randn(1_000_003, generator=gen)
    chosen, ref_values, ref_after = topk_reference(g, residual, 10_000)
    res = residual.to(device)
    values, indices = ops.topk_compress(g.to(device), res, 10_000)
    np.testing.assert_array_equal(indices.cpu().numpy(), chosen)
    assert torch.equal(values.cpu(), ref_values)
    assert torch.equal(res.cpu(), ref_after)
    dense = ops.topk_decompress(values, indices, torch.zeros(1_000_003, device=device), scale=0.25)
    expected = torch.zeros(1_000_003)
    expected[torch.from_numpy(chosen)] = 0.25 * ref_values
    assert torch.equal(dense.cpu(), expected)


@pytest.mark.cuda
def test_device_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"residual: expected a tensor on cuda:0 like grad, got one on cpu"):
        ops.topk_compress(torch.randn(10, device="cuda"), torch.randn(10), 2)


def test_sampled_bound_that_misses_falls_back_to_exact_select() -> None:
    # Large tensors first estimate the threshold from 256 evenly spread blocks. Make exactly those
    # blocks hold the largest values so the estimate is too high: the result must stay exact.
    n, block, blocks = 1 << 20, 256, 256
    g = torch.ones(n)
    for j in range(blocks):
        start = (n - block) * j // (blocks - 1)
        g[start : start + block] = 2.0
    residual = torch.zeros(n)
    check_against_reference(g, residual, 100_000)
    check_against_reference(g, None, 70_000)


def test_sparse_gradient_with_mostly_zeros() -> None:
    g = torch.zeros(1 << 19)
    g[torch.randperm(1 << 19, generator=torch.Generator().manual_seed(1))[:50]] = torch.randn(50)
    check_against_reference(g, torch.zeros_like(g), 500)  # more than the non-zeros: zeros by index


def test_missed_bound_restores_the_entries_it_already_cleared() -> None:
    # Distinct values inside the sampled blocks give a non-empty "sure" set (cleared in the
    # residual during the pass) yet far fewer than k kept entries: the exact select that follows
    # must see acc there again, and the residual must end exactly as the reference says.
    n, block, blocks = 1 << 20, 256, 256
    g = torch.ones(n)
    ramp = 2.0 + torch.arange(block, dtype=torch.float32) / 1000
    for j in range(blocks):
        start = (n - block) * j // (blocks - 1)
        g[start : start + block] = ramp
    check_against_reference(g, torch.zeros(n), 100_000)
    check_against_reference(g, 0.001 * torch.randn(n, generator=torch.Generator().manual_seed(3)), 100_000)


def test_decompress_unchecked_skips_out_of_range_indices() -> None:
    out = torch.arange(10, dtype=torch.float32)
    values = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0])
    indices = torch.tensor([3, 10, -1, 3, 9], dtype=torch.int32)
    ops.topk_decompress(values, indices, out, scale=0.5, check_indices=False)
    expected = torch.arange(10, dtype=torch.float32)
    expected[3] += 0.5 + 4.0
    expected[9] += 8.0
    assert torch.equal(out, expected)
    # The same call checked raises and writes nothing.
    with pytest.raises(ValueError, match="outside out"):
        ops.topk_decompress(values, indices, out)
    assert torch.equal(out, expected)
    with pytest.raises(TypeError, match="check_indices"):
        ops.topk_decompress(values, indices, out, check_indices=1)  # type: ignore[arg-type]


def test_decompress_unchecked_matches_checked_on_valid_indices() -> None:
    gen = torch.Generator().manual_seed(21)
    indices = torch.randint(0, 50_000, (2_000_000,), generator=gen, dtype=torch.int32)  # threaded sweep
    values = torch.randn(2_000_000, generator=gen)
    checked = ops.topk_decompress(values, indices, torch.zeros(50_000))
    unchecked = ops.topk_decompress(values, indices, torch.zeros(50_000), check_indices=False)
    assert torch.equal(checked, unchecked)
