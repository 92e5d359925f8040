"""Workloads and baselines shared by bench_grad_stats.py and ratios_grad_stats.py."""

from __future__ import annotations

from typing import Any

import torch


def gpt_shapes(d_model: int = 768, layers: int = 12, vocab: int = 50257, context: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2 style model (defaults: the 124M-parameter GPT-2 small)."""
    shapes: list[tuple[int, ...]] = [(vocab, d_model), (context, d_model)]
    d = d_model
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    shapes += [(d,), (d,)]
    return shapes


def gradient_list(
    shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
) -> list[torch.Tensor]:
    """Gradient-like tensors (small, centred, a few outliers) of the given shapes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g) * 1e-3
        out.append(t.to(dtype=dtype, device=device))
    return out


def tiny_tensors(count: int = 10_000, seed: int = 1, device: str = "cpu") -> list[torch.Tensor]:
    """``count`` tensors of 1..256 elements."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 257, (count,), generator=g).tolist()
    return [torch.randn(n, generator=g).to(device) for n in sizes]


def torch_loop(tensors: list[torch.Tensor]) -> list[tuple[Any, ...]]:
    """What a user writes without a fused kernel: one statistic per call, per tensor."""
    out = []
    for t in tensors:
        var, mean = torch.var_mean(t, correction=0)
        norm = torch.linalg.vector_norm(t)
        maxabs = t.abs().amax()
        nonfinite = t.numel() - torch.isfinite(t).sum()
        out.append((t.sum(), norm, maxabs, nonfinite, mean, var))
    return out


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The fastest single statistic torch offers for a list (what clip_grad_norm_ uses)."""
    return list(torch._foreach_norm(tensors))
