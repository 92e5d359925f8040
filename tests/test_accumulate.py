"""autoglm_rt.ops.add_sumsq_ against torch's own addition and a float64 numpy sum of squares."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import autoglm_rt
from autoglm_rt.ops import add_sumsq_


def reference_sumsq(tensors: list[torch.Tensor]) -> float:
    return float(sum(np.sum(t.detach().numpy().astype(np.float64) ** 2) for t in tensors))


def sizes_lists() -> list[list[int]]:
    # One element, odd tails, one item exactly, many tiny tensors, several tasks (parallel path).
    return [[1], [7, 0, 13], [1 << 16], [3] * 500, [1 << 18, 5, (1 << 17) + 3]]


@pytest.mark.parametrize("sizes", sizes_lists())
def test_adds_like_torch_and_measures_the_added_gradients(sizes: list[int]) -> None:
    g = torch.Generator().manual_seed(sum(sizes))
    dst = [torch.randn(n, generator=g) for n in sizes]
    src = [torch.randn(n, generator=g) * 3 for n in sizes]
    expected = [d.clone() for d in dst]
    torch._foreach_add_(expected, src)
    got = add_sumsq_(dst, src)
    for d, e in zip(dst, expected, strict=True):
        assert torch.equal(d, e)  # bit for bit: one float32 rounding per element, as torch.add
    assert got == pytest.approx(reference_sumsq(src), rel=1e-12)


def test_empty_dst_only_measures_and_writes_nothing() -> None:
    src = [torch.randn(300), torch.randn(5, 4)]
    before = [s.clone() for s in src]
    assert add_sumsq_([], src) == pytest.approx(reference_sumsq(src), rel=1e-12)
    assert all(torch.equal(s, b) for s, b in zip(src, before, strict=True))
    assert add_sumsq_([], []) == 0.0
    assert add_sumsq_([torch.empty(0)], [torch.empty(0)]) == 0.0


def test_the_sum_is_the_same_bits_on_any_thread_count() -> None:
    src = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (1 << 19, 1000, 1 << 18)]
    threads = autoglm_rt.num_threads()
    try:
        results = []
        for n in (1, 2, 4):
            autoglm_rt.set_num_threads(n)
            results.append(add_sumsq_([], src))
    finally:
        autoglm_rt.set_num_threads(threads)
    assert results[0] == results[1] == results[2]


def test_nan_and_inf_propagate_like_plain_arithmetic() -> None:
    src = [torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([float("nan")])]
    dst = [torch.zeros(3), torch.ones(1)]
    assert math.isnan(add_sumsq_(dst, src))
    assert dst[0][1] == float("inf") and math.isnan(float(dst[1][0]))
    assert add_sumsq_([], [torch.tensor([float("inf"), 1.0])]) == math.inf


def test_numpy_arrays_go_through_dlpack() -> None:
    dst, src = np.zeros(10, dtype=np.float32), np.arange(10, dtype=np.float32)
    assert add_sumsq_([dst], [src]) == pytest.approx(float(np.sum(src.astype(np.float64) ** 2)))
    assert np.array_equal(dst, src)
    frozen = np.zeros(10, dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises((ValueError, BufferError, TypeError), match="dst\\[0\\]"):
        add_sumsq_([frozen], [src])
    assert not frozen.any()


def bad_calls() -> list[tuple[object, object, type[Exception], str]]:
    ok = torch.ones(4)
    return [
        ([], [ok.double()], TypeError, r"src\[0\].*float32"),
        ([], [ok.bfloat16()], TypeError, r"src\[0\].*float32"),
        ([ok.half()], [ok], TypeError, r"dst\[0\].*float32"),
        ([], [torch.ones(4, 4).t()], TypeError, r"src\[0\].*contiguous"),
        ([], [torch.ones(4, device="meta")], TypeError, r"src\[0\]"),
        ([torch.ones(4)], [ok, ok], ValueError, r"dst: expected an empty list or 2 tensors"),
        ([torch.ones(5)], [ok], ValueError, r"dst\[0\]: expected 4 elements"),
        ([], ok, TypeError, r"src: expected a list or tuple of tensors"),
        ("abc", [ok], TypeError, r"dst: expected a list or tuple of tensors"),
        ([], [torch.ones(4, dtype=torch.int64)], TypeError, r"src\[0\]"),
    ]


@pytest.mark.parametrize(("dst", "src", "exc", "match"), bad_calls())
def test_bad_input_is_refused_in_one_line(dst: object, src: object, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match) as info:
        add_sumsq_(dst, src)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_a_refused_call_writes_nothing() -> None:
    """The last pair is wrong: the first must not have been added either."""
    dst = [torch.zeros(8), torch.zeros(8)]
    with pytest.raises(TypeError, match=r"src\[1\]"):
        add_sumsq_(dst, [torch.ones(8), torch.ones(8, dtype=torch.float64)])
    assert not any(d.any() for d in dst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_are_refused_with_the_device_named() -> None:
    with pytest.raises(TypeError, match="CPU tensors, got one on cuda:0"):
        add_sumsq_([], [torch.ones(4, device="cuda")])
