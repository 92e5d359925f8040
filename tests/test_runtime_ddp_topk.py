"""Runtime with the top-k DDP hook on two gloo ranks (127.0.0.1): the noise scale comes from the
hook's per-rank vs averaged norms, and the ranks stay in step."""

from __future__ import annotations

import pytest

from tests import runtime_ddp_scenarios
from tests.ddp_harness import run_on_two_ranks

pytestmark = pytest.mark.distributed


def test_runtime_reads_the_noise_scale_from_the_topk_hook() -> None:
    r0, r1 = run_on_two_ranks(runtime_ddp_scenarios.topk_runtime, timeout=150)
    for r in (r0, r1):
        assert r["accumulation"] == 2 and r["compressed_buckets"] > 0
        assert any(v is not None for v in r["ref_noise"])
        for got, want in zip(r["runtime_noise"], r["ref_noise"], strict=True):
            assert (got is None and want is None) or got == pytest.approx(want, rel=1e-12)
    assert r0["runtime_noise"] == r1["runtime_noise"]  # the same all-reduced norms on both ranks
    assert r0["params"] == r1["params"]
