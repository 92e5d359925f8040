"""autoglm_rt.ops.grad_stats against a float64 numpy reference (tests/grad_stats_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import autoglm_rt
from autoglm_rt import ops
from tests.grad_stats_reference import FIELDS, chunked_stats, reference, stats_of, to_float64

RTOL = 1e-6


def assert_matches(got: dict[str, float], ref: dict[str, float], where: str) -> None:
    """Counts exactly; sum and mean relative to sum|x| (cancellation); the rest relative to
    themselves; NaN where the reference is NaN."""
    assert got["numel"] == ref["numel"], where
    assert got["nonfinite"] == ref["nonfinite"], where
    count = ref["numel"] - ref["nonfinite"]
    tiny = 1e-300
    assert abs(got["sum"] - ref["sum"]) <= RTOL * ref["sum_abs"] + tiny, (where, got["sum"], ref["sum"])
    assert abs(got["sumsq"] - ref["sumsq"]) <= RTOL * ref["sumsq"] + tiny, (where, got["sumsq"], ref["sumsq"])
    assert got["maxabs"] == pytest.approx(ref["maxabs"], rel=RTOL, abs=tiny), where
    if count == 0:
        assert math.isnan(got["mean"]) and math.isnan(got["var"]), where
        return
    mean_abs = ref["sum_abs"] / count
    assert abs(got["mean"] - ref["mean"]) <= RTOL * mean_abs + tiny, (where, got["mean"], ref["mean"])
    assert abs(got["var"] - ref["var"]) <= RTOL * ref["var"] + tiny, (where, got["var"], ref["var"])


def check(tensors: list, stats: ops.GradStats | None = None) -> ops.GradStats:
    stats = ops.grad_stats(tensors) if stats is None else stats
    per, total = reference(tensors)
    assert len(stats) == len(tensors)
    columns = {name: getattr(stats, name) for name in FIELDS}
    for i, ref in enumerate(per):
        assert_matches({name: float(columns[name][i]) for name in FIELDS}, ref, f"tensor {i}")
    assert_matches({name: float(getattr(stats.total, name)) for name in FIELDS}, total, "total")
    return stats


def randn(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, loc: float = 0.0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=torch.float64) * scale + loc).to(dtype)


# --- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_random_shapes_match_reference(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(1)
    shapes = [tuple(int(s) for s in rng.integers(1, 70, size=rng.integers(1, 4))) for _ in range(40)]
    tensors = [
        randn(int(np.prod(s)), dtype, seed=i, loc=float(rng.normal()), scale=float(rng.uniform(0.1, 3))).reshape(s)
        for i, s in enumerate(shapes)
    ]
    stats = check(tensors)
    assert stats.numel.dtype == np.int64 and stats.nonfinite.dtype == np.int64
    assert stats.sum.dtype == np.float64 and isinstance(stats.total.numel, int)


def test_numpy_arrays_are_accepted() -> None:
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (1, 100, 5000)]
    check(arrays)


def test_empty_list() -> None:
    stats = ops.grad_stats([])
    assert len(stats) == 0 and stats.numel.shape == (0,)
    assert stats.total.numel == 0 and stats.total.nonfinite == 0
    assert stats.total.sum == 0.0 and stats.total.sumsq == 0.0 and stats.total.maxabs == 0.0
    assert math.isnan(stats.total.mean) and math.isnan(stats.total.var)


def test_empty_and_one_element_tensors() -> None:
    tensors = [torch.zeros(0), torch.tensor([-2.5]), torch.zeros((3, 0)), torch.tensor([7.0], dtype=torch.bfloat16)]
    stats = check(tensors)
    assert stats.numel.tolist() == [0, 1, 0, 1]
    assert stats.var[1] == 0.0 and stats.mean[1] == -2.5 and stats.maxabs[0] == 0.0


@pytest.mark.parametrize("k", [3, 4, 7, 8, 16, 17])
def test_power_of_two_sizes_plus_minus_one(k: int) -> None:
    # Sizes around the vector width (8), the block (128) and the item (65536) boundaries.
    sizes = [2**k - 1, 2**k, 2**k + 1]
    check([randn(n, seed=n, loc=0.5) for n in sizes])


def test_ten_thousand_tiny_tensors() -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(0, 40, size=10_000)
    flat = randn(int(sizes.sum()), seed=4, loc=0.1)
    tensors = [t.clone() for t in torch.split(flat, sizes.tolist())]
    stats = ops.grad_stats(tensors)
    per, total = reference(tensors)
    for name in ("numel", "nonfinite"):
        np.testing.assert_array_equal(getattr(stats, name), [r[name] for r in per])
    for name in ("sum", "mean"):
        scale = np.array(
            [r["sum_abs"] / max(1, r["numel"] - r["nonfinite"]) if name == "mean" else r["sum_abs"] for r in per]
        )
        ref = np.array([r[name] for r in per])
        got = getattr(stats, name)
        finite = ~np.isnan(ref)
        assert np.all(np.abs(got[finite] - ref[finite]) <= RTOL * scale[finite] + 1e-300)
        assert np.all(np.isnan(got[~finite]))
    for name in ("sumsq", "maxabs", "var"):
        ref = np.array([r[name] for r in per])
        np.testing.assert_allclose(getattr(stats, name), ref, rtol=RTOL, atol=1e-300, equal_nan=True)
    assert_matches({n: float(getattr(stats.total, n)) for n in FIELDS}, total, "total")


@pytest.mark.slow
def test_hundred_million_float32_elements() -> None:
    # Not centred (mean 3, std 0.5): the variance needs the shifted/Welford merge to be exact.
    rng = np.random.default_rng(5)
    x = rng.standard_normal(100_000_000, dtype=np.float32)
    x *= np.float32(0.5)
    x += np.float32(3.0)
    stats = ops.grad_stats([x])
    ref = chunked_stats(x)
    assert_matches({n: float(getattr(stats.total, n)) for n in FIELDS}, ref, "1e8 total")
    assert_matches({n: float(getattr(stats, n)[0]) for n in FIELDS}, ref, "1e8 tensor")


def test_nan_and_inf_are_counted_and_excluded() -> None:
    rng = np.random.default_rng(6)
    tensors = []
    for i, n in enumerate((1, 9, 130, 1000, 70_000)):
        t = randn(n, seed=i, loc=2.0)
        idx = torch.from_numpy(rng.choice(n, size=max(1, n // 50), replace=False))
        t[idx[0::3]] = float("nan")
        t[idx[1::3]] = float("inf")
        t[idx[2::3]] = float("-inf")
        tensors.append(t)
    first_nan = randn(300, seed=9, loc=1000.0, scale=0.01)
    first_nan[0] = float("nan")  # the shift then comes from the next finite element
    tensors += [first_nan, torch.full((200,), float("nan")), torch.full((5,), float("inf"), dtype=torch.float16)]
    stats = check(tensors)
    assert stats.nonfinite[-2] == 200 and math.isnan(stats.mean[-2]) and stats.maxabs[-2] == 0.0
    assert stats.total.nonfinite == sum(int((~torch.isfinite(t)).sum()) for t in tensors)


def test_float16_and_bfloat16_extremes() -> None:
    f16 = torch.tensor([65504.0, -65504.0, 6.1e-5, 5.96e-8, -5.96e-8, 0.0, 1.0] * 40, dtype=torch.float16)
    bf16_max = torch.finfo(torch.bfloat16).max
    bf16 = torch.tensor([bf16_max, -bf16_max, 1e-38, 1.0, -3.0] * 40, dtype=torch.bfloat16)
    bf16_tiny = torch.full((300,), 1e-30, dtype=torch.bfloat16)
    f32_huge = torch.tensor([3e38, -1e30, 1e20, 2.0] * 64, dtype=torch.float32)
    f32_tiny = randn(1000, seed=7, scale=1e-25)
    stats = check([f16, bf16, bf16_tiny, f32_huge, f32_tiny])
    assert stats.maxabs[0] == 65504.0 and stats.maxabs[1] == float(bf16_max)
    assert np.isfinite(stats.sumsq).all()  # squares of 3e38 overflow float32 but not float64


def test_far_from_zero_mean_keeps_variance_exact() -> None:
    # |mean| / std = 1e5: a naive sumsq - sum^2/n in float64 would lose the variance.
    check([randn(200_000, seed=8, loc=1e4, scale=0.1), randn(1000, dtype=torch.bfloat16, seed=9, loc=-300.0)])


def test_results_do_not_depend_on_thread_count() -> None:
    tensors = [randn(n, seed=n) for n in (10, 1000, 300_000, 70_001)] + [randn(20, seed=i) for i in range(500)]
    before = autoglm_rt.num_threads()
    try:
        tables = []
        for threads in (1, 2, 3, 7):
            autoglm_rt.set_num_threads(threads)
            tables.append(ops.grad_stats(tensors).table.copy())
    finally:
        autoglm_rt.set_num_threads(before)
    for t in tables[1:]:
        np.testing.assert_array_equal(t, tables[0])  # bit-identical, NaN-free here


def test_input_tensors_are_not_modified() -> None:
    t = randn(5000, seed=10)
    t[3] = float("nan")
    copy = t.clone()
    ops.grad_stats([t, t[:100]])
    assert torch.equal(t.isnan(), copy.isnan()) and torch.equal(t.nan_to_num(), copy.nan_to_num())


def test_matches_torch_norms_a_user_would_compute() -> None:
    tensors = [randn(n, seed=n) for n in (17, 4096, 100_003)]
    stats = ops.grad_stats(tensors)
    norms = torch.stack(torch._foreach_norm([t.double() for t in tensors]))
    np.testing.assert_allclose(np.sqrt(stats.sumsq), norms.numpy(), rtol=1e-7)
    total_norm = torch.nn.utils.get_total_norm([t.double() for t in tensors])
    assert math.sqrt(stats.total.sumsq) == pytest.approx(float(total_norm), rel=1e-7)


# --- bad input --------------------------------------------------------------------------------


def test_integer_dtype_is_rejected_with_its_name() -> None:
    with pytest.raises(TypeError, match=r"tensors\[1\].*float32, float16 or bfloat16.*int64"):
        ops.grad_stats([torch.zeros(3), torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(TypeError, match=r"tensors\[0\].*float64"):
        ops.grad_stats([torch.zeros(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match=r"tensors\[0\].*int32"):
        ops.grad_stats([np.zeros(3, dtype=np.int32)])


def test_non_contiguous_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"tensors\[0\].*contiguous"):
        ops.grad_stats([torch.zeros(4, 4).t()])
    with pytest.raises(TypeError, match=r"tensors\[1\].*contiguous"):
        ops.grad_stats([np.zeros(4, np.float32), np.zeros((4, 4), np.float32)[:, 1]])


def test_not_a_list_of_tensors_is_rejected() -> None:
    with pytest.raises(TypeError, match="single Tensor"):
        ops.grad_stats(torch.zeros(3))
    with pytest.raises(TypeError, match="tensors"):
        ops.grad_stats(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        ops.grad_stats([torch.zeros(3), None])
    with pytest.raises(TypeError, match=r"tensors\[0\].*dense"):
        ops.grad_stats([torch.zeros(3).to_sparse()])
    with pytest.raises(TypeError, match=r"tensors\[0\].*dense"):
        ops.grad_stats([torch.zeros(3).to_mkldnn()])


def test_mixed_devices_are_rejected() -> None:
    # The meta device stands in for "another device" on a CPU-only machine.
    with pytest.raises(TypeError, match=r"tensors\[1\].*CPU or CUDA"):
        ops.grad_stats([torch.zeros(3), torch.zeros(3, device="meta")])


def test_generators_and_tuples_are_accepted() -> None:
    tensors = (randn(10, seed=1), randn(20, seed=2))
    a = ops.grad_stats(tensors).table
    b = ops.grad_stats(t for t in tensors).table
    np.testing.assert_array_equal(a, b)


# --- CUDA (compiled here, never run here) ----------------------------------------------------


def test_device_results_match_reference(device: str) -> None:
    tensors = [
        randn(n, dtype, seed=n).to(device)
        for n in (0, 1, 1000, 65_537, 300_001)
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    ]
    tensors[6][7] = float("nan")  # n=1000, float32
    stats = ops.grad_stats(tensors)
    assert stats.on_device == (device == "cuda")
    cpu_tensors = [t.cpu() for t in tensors]
    table = stats.table if device == "cpu" else stats.table.cpu().numpy()
    check(cpu_tensors, ops.GradStats(table))


@pytest.mark.cuda
def test_cuda_results_stay_on_device_and_are_deterministic() -> None:
    tensors = [randn(n, seed=n).cuda() for n in [3, 70_000, 1_000_003] + [17] * 3000]
    first = ops.grad_stats(tensors)
    assert first.table.device.type == "cuda" and first.sum.device.type == "cuda"
    assert first.total.sumsq.device.type == "cuda"
    again = ops.grad_stats(tensors)
    assert torch.equal(first.table, again.table)
    check([t.cpu() for t in tensors], ops.GradStats(first.table.cpu().numpy()))


@pytest.mark.cuda
def test_cuda_mixed_with_cpu_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"tensors\[1\].*cuda:0"):
        ops.grad_stats([torch.zeros(3, device="cuda"), torch.zeros(3)])


def test_to_float64_reference_is_exact_for_half_types() -> None:
    # The reference widens exactly: the largest float16 and bfloat16 survive the round trip.
    assert to_float64(torch.tensor([65504.0], dtype=torch.float16))[0] == 65504.0
    assert stats_of(np.array([1.0, np.nan]))["nonfinite"] == 1


# --- every CPU code path ----------------------------------------------------------------------

_SIMD_CHECK = """
import sys
sys.path.insert(0, {root!r})
import torch
from tests.test_grad_stats import check, randn
tensors = [randn(n, dt, seed=n, loc=1.5) for n in (0, 1, 63, 64, 65, 127, 128, 129, 65_537, 200_003)
           for dt in (torch.float32, torch.float16, torch.bfloat16)]
tensors[9][3] = float("nan")  # n=64, float32
tensors.append(torch.tensor([3e38, 1e-30, -2.0] * 100))
check(tensors)
print("ok")
"""


@pytest.mark.parametrize("simd", ["scalar", "avx2", "avx512"])
def test_every_simd_path_matches_reference(simd: str) -> None:
    # AUTOGLM_RT_GRAD_STATS_SIMD caps the vector ISA (read once per process), so each path runs in
    # a fresh interpreter; on a CPU without the ISA the best available path runs instead.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "AUTOGLM_RT_GRAD_STATS_SIMD": simd}
    res = subprocess.run(
        [sys.executable, "-c", _SIMD_CHECK.format(root=root)], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


# --- property test ----------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402  (a test dependency: missing means a broken setup)
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_float32_arrays = hnp.arrays(
    np.float32,
    st.integers(0, 300),
    elements=st.floats(width=32, allow_nan=True, allow_infinity=True),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_float32_arrays, min_size=1, max_size=4))
def test_property_any_float32_values(arrays: list[np.ndarray]) -> None:
    stats = ops.grad_stats(arrays)
    per, _ = reference(arrays)
    for i, ref in enumerate(per):
        got = {name: float(getattr(stats, name)[i]) for name in FIELDS}
        count = ref["numel"] - ref["nonfinite"]
        assert got["numel"] == ref["numel"] and got["nonfinite"] == ref["nonfinite"]
        assert abs(got["sum"] - ref["sum"]) <= RTOL * ref["sum_abs"] + 1e-300
        assert abs(got["sumsq"] - ref["sumsq"]) <= RTOL * ref["sumsq"] + 1e-300
        assert got["maxabs"] == ref["maxabs"]
        if count == 0:
            assert math.isnan(got["mean"]) and math.isnan(got["var"])
            continue
        mean_abs = ref["sum_abs"] / count
        assert abs(got["mean"] - ref["mean"]) <= RTOL * mean_abs + 1e-300
        # A variance far below the inputs' float32 resolution (e.g. a constant tensor) is only
        # meaningful down to that resolution: (2^-24 * mean|x|)^2.
        resolution = (2.0**-24 * mean_abs) ** 2
        assert abs(got["var"] - ref["var"]) <= RTOL * ref["var"] + resolution + 1e-300, (got["var"], ref["var"])
