"""Fused gradient accumulation: add one gradient into another and measure it in the same pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from autoglm_rt._native import _C


def add_sumsq_(dst: Sequence[Any], src: Sequence[Any]) -> float:
    """``dst[i] += src[i]`` for every ``i`` and the sum of squares of every element of ``src``
    (float64), in one native pass over memory; ``dst`` may be empty (only the sum of squares).

    Tensors: float32, contiguous, on the CPU (torch tensors or anything with DLPack); ``dst[i]``
    writable and as large as ``src[i]``. The additions round as ``torch.add`` does (bit-identical
    to ``torch._foreach_add_(dst, src)``); NaN and Inf propagate. Raises TypeError (dtype, device,
    layout, not a list) or ValueError (lengths, sizes, read-only ``dst``) before writing anything.
    """
    return float(_C.add_sumsq(dst, src))


__all__ = ["add_sumsq_"]
