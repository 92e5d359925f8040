"""The bandwidth probe against what a user would reach for: numpy's copy and sum."""

from __future__ import annotations

import numpy as np

from autoglm_rt import benchmarking
from autoglm_rt._native import _C


def run(ctx) -> list[benchmarking.Comparison]:  # type: ignore[no-untyped-def]
    n = (16 if ctx.quick else 256) * 2**20 // 8
    src = np.ones(n, dtype=np.int64)
    dst = np.empty_like(src)
    rounds = 3 if ctx.quick else 7
    return [
        benchmarking.compare(
            "read probe vs numpy sum",
            lambda: _C.read_checksum(src),
            lambda: src.sum(),
            baseline_label="numpy.sum",
            rounds=rounds,
            bytes_read=src.nbytes,
            read_gbps=ctx.bandwidth["read_gbps"],
        ),
        benchmarking.compare(
            "copy probe vs numpy copyto",
            lambda: _C.parallel_copy(dst, src),
            lambda: np.copyto(dst, src),
            baseline_label="numpy.copyto",
            rounds=rounds,
        ),
    ]
