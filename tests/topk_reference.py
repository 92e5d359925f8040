"""Obviously-correct references for the top-k kernels: numpy/torch, float64 where it matters."""

from __future__ import annotations

import numpy as np
import torch


def accumulate(grad: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """acc = grad + residual in float32, rounded to grad's dtype (the kernel's documented rule)."""
    if residual is None:
        return grad.clone()
    return (grad.float() + residual.float()).to(grad.dtype)


def topk_reference(
    grad: torch.Tensor, residual: torch.Tensor | None, k: int, value_dtype: torch.dtype = torch.float32
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(indices ascending, values, residual after) by a stable sort on (-|acc|, index), NaN first."""
    acc = accumulate(grad.reshape(-1), None if residual is None else residual.reshape(-1))
    a = acc.double().numpy()
    nan = np.isnan(a)
    mag = np.where(nan, 0.0, np.abs(a))
    order = np.lexsort((np.arange(a.size), -mag, ~nan))  # last key sorts first: NaN, then |acc| desc
    chosen = np.sort(order[:k])
    values = acc[torch.from_numpy(chosen)].to(value_dtype)
    after = acc.clone()
    after[torch.from_numpy(chosen)] = 0
    return chosen, values, after


def decompress_reference(values: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, scale: float) -> np.ndarray:
    """out + scale * scatter-add(values) in float64."""
    ref = out.double().numpy().reshape(-1).copy()
    np.add.at(ref, indices.numpy().astype(np.int64), scale * values.double().numpy())
    return ref
