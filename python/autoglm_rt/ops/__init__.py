"""Fused tensor kernels of the native core, over torch tensors (CPU; CUDA where compiled)."""

from __future__ import annotations

from autoglm_rt.ops.topk import topk_compress, topk_decompress

__all__ = ["topk_compress", "topk_decompress"]
