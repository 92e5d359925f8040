"""pytest-benchmark: grad_stats and its baselines on small workloads (CI runs these once with
--benchmark-disable, so each also asserts that the answers agree)."""

from __future__ import annotations

import numpy as np
import torch

from autoglm_rt import ops
from grad_stats_workloads import foreach_norm, gpt_shapes, gradient_list, tiny_tensors, torch_loop

SMALL_GPT = gpt_shapes(d_model=128, layers=2, vocab=2000, context=256)


def test_grad_stats_small_gpt(benchmark) -> None:  # type: ignore[no-untyped-def]
    tensors = gradient_list(SMALL_GPT)
    stats = benchmark(ops.grad_stats, tensors)
    norms = torch.stack(foreach_norm([t.double() for t in tensors])).numpy()
    np.testing.assert_allclose(np.sqrt(stats.sumsq), norms, rtol=1e-6)


def test_foreach_norm_small_gpt(benchmark) -> None:  # type: ignore[no-untyped-def]
    tensors = gradient_list(SMALL_GPT)
    norms = benchmark(foreach_norm, tensors)
    assert len(norms) == len(tensors)


def test_torch_loop_small_gpt(benchmark) -> None:  # type: ignore[no-untyped-def]
    tensors = gradient_list(SMALL_GPT)
    rows = benchmark(torch_loop, tensors)
    stats = ops.grad_stats(tensors)
    np.testing.assert_allclose([float(r[5]) for r in rows], stats.var, rtol=1e-4)


def test_grad_stats_tiny_tensors(benchmark) -> None:  # type: ignore[no-untyped-def]
    tensors = tiny_tensors(1000)
    stats = benchmark(ops.grad_stats, tensors)
    np.testing.assert_array_equal(stats.numel, [t.numel() for t in tensors])
