"""pytest-benchmark: the bandwidth probes (CI runs these once with --benchmark-disable)."""

from __future__ import annotations

import numpy as np

from autoglm_rt._native import _C

N = 8 * 2**20 // 8


def test_read_probe(benchmark) -> None:  # type: ignore[no-untyped-def]
    src = np.arange(N, dtype=np.int64)
    checksum = benchmark(_C.read_checksum, src)
    assert checksum == _C.read_checksum(src.copy())


def test_numpy_sum_baseline(benchmark) -> None:  # type: ignore[no-untyped-def]
    src = np.arange(N, dtype=np.int64)
    assert benchmark(src.sum) == N * (N - 1) // 2


def test_copy_probe(benchmark) -> None:  # type: ignore[no-untyped-def]
    src = np.arange(N, dtype=np.int64)
    dst = np.zeros_like(src)
    benchmark(_C.parallel_copy, dst, src)
    np.testing.assert_array_equal(dst, src)
