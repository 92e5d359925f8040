"""autoglm_rt.demo.projection: the alpha-beta step-time table against hand-computed values."""

from __future__ import annotations

import pytest

from autoglm_rt.demo.projection import DEFAULT_GBITS, DEFAULT_RANKS, projected_step_times, relative_error

MEASURED = {"compute_s": 0.2, "compress_s": 0.01, "decompress_s": 0.001, "dense_bytes": 1e6, "message_bytes": 2e4}


def test_two_ranks_one_gbit_by_hand() -> None:
    (row,) = projected_step_times(**MEASURED, latency_s=0.0, gbits=[1.0], ranks=[2])
    # Ring all-reduce at P=2 moves 2*(1/2)*N bytes: 1e6 B / 1.25e8 B/s = 8 ms.
    assert row.allreduce_step_s == pytest.approx(0.2 + 0.008)
    # All-gather at P=2 moves one message: 2e4 / 1.25e8 = 0.16 ms; two scatter-adds of 1 ms.
    assert row.topk_step_s == pytest.approx(0.2 + 0.01 + 0.00016 + 0.002)
    assert row.speedup == pytest.approx(row.allreduce_step_s / row.topk_step_s)


def test_latency_and_buckets_and_the_default_grid() -> None:
    rows = projected_step_times(**MEASURED, latency_s=1e-4, buckets=3)
    assert [(r.gbit_s, r.ranks) for r in rows] == [(g, p) for g in DEFAULT_GBITS for p in DEFAULT_RANKS]
    r = next(r for r in rows if r.gbit_s == 10.0 and r.ranks == 1024)
    bw = 10e9 / 8
    assert r.allreduce_step_s == pytest.approx(0.2 + 3 * 2 * 1023 * 1e-4 + 2 * 1023 / 1024 * 1e6 / bw)
    assert r.topk_step_s == pytest.approx(0.2 + 0.01 + 3 * 1023 * 1e-4 + 1023 * 2e4 / bw + 1024 * 0.001)
    # Fixed-k all-gather grows with P, ring all-reduce does not: the gain shrinks at scale.
    one_gbit = [r.speedup for r in rows if r.gbit_s == 1.0]
    assert one_gbit[0] > one_gbit[-1]


def test_bad_inputs_are_rejected() -> None:
    for bad in ({"compute_s": -1.0}, {"dense_bytes": float("nan")}, {"buckets": 0}, {"ranks": [1]}, {"gbits": [0.0]}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            projected_step_times(**(MEASURED | bad))  # type: ignore[arg-type]
    assert relative_error(1.1, 1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="measured_s"):
        relative_error(1.0, 0.0)
