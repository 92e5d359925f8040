"""pytest-benchmark: fused top-k compression vs the torch pipeline; each asserts that both select
the same entries. Error feedback rewrites the residual, so every round gets a fresh copy through
``setup=`` (outside the timing): rounds 2 and 3 would otherwise see another input. CI runs these
once with benchmarking on (``make bench-check``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from autoglm_rt import ops

_spec = importlib.util.spec_from_file_location("ratios_topk", Path(__file__).with_name("ratios_topk.py"))
assert _spec and _spec.loader
ratios_topk = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ratios_topk)

N = 1 << 20
K = N // 100


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, generator=gen), 0.1 * torch.randn(N, generator=gen)


@pytest.mark.parametrize("density", [0.01, 0.1])
def test_topk_compress(benchmark, density: float) -> None:  # type: ignore[no-untyped-def]
    grad, residual = _inputs()
    acc = grad + residual
    k = int(N * density)
    values, indices = benchmark.pedantic(
        ops.topk_compress, setup=lambda: ((grad, residual.clone(), k), {}), rounds=3, iterations=1
    )
    expected = np.sort(torch.topk(acc.abs(), k).indices.numpy())  # continuous data: no ties
    np.testing.assert_array_equal(indices.numpy(), expected)
    assert torch.equal(values, acc[expected])


def test_torch_pipeline_baseline(benchmark) -> None:  # type: ignore[no-untyped-def]
    grad, residual = _inputs()
    acc = grad + residual
    _values, indices = benchmark.pedantic(
        ratios_topk.torch_pipeline, setup=lambda: ((grad, residual.clone(), K), {}), rounds=3, iterations=1
    )
    assert set(indices.tolist()) == set(torch.topk(acc.abs(), K).indices.tolist())


def test_topk_decompress(benchmark) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(2 * K, generator=gen)
    indices = torch.randint(0, N, (2 * K,), generator=gen, dtype=torch.int32)
    out = benchmark(lambda: ops.topk_decompress(values, indices, torch.zeros(N), scale=0.5))
    torch.testing.assert_close(out, torch.zeros(N).index_add_(0, indices, values, alpha=0.5))
