"""Fused native operations on lists of tensors (gradient statistics, ...)."""

from __future__ import annotations

from autoglm_rt.ops.accumulate import add_sumsq_
from autoglm_rt.ops.grad_stats import GradStats, GradStatsTotal, grad_stats
from autoglm_rt.ops.onebit import (
    onebit_adam_compress,
    onebit_adam_decompress,
    sign_compress,
    sign_decompress,
    sign_message_sizes,
)
from autoglm_rt.ops.topk import topk_compress, topk_decompress

__all__ = [
    "GradStats",
    "GradStatsTotal",
    "add_sumsq_",
    "grad_stats",
    "onebit_adam_compress",
    "onebit_adam_decompress",
    "sign_compress",
    "sign_decompress",
    "sign_message_sizes",
    "topk_compress",
    "topk_decompress",
]
