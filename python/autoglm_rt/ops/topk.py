"""Fused top-k gradient compression with error feedback, and its scatter-add inverse.

``topk_compress`` ranks the entries of ``acc = grad + residual`` (computed in float32, rounded to
grad's dtype) by magnitude and returns exactly k of them, in ascending index order. NaN ranks above
+Inf and ties go to the lower index, so the result depends on the input alone. ``residual`` is
updated in place to ``acc`` with the selected entries zeroed (error feedback), which gives the
identity ``topk_decompress(values, indices, zeros) + residual_after == grad + residual_before``.
"""

from __future__ import annotations

import torch

from autoglm_rt._native import _C
from autoglm_rt.ops._wrapper_args import require_tensor, stream_of

_VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31


def index_dtype_for(numel: int) -> torch.dtype:
    """The index dtype topk_compress uses for a tensor of ``numel`` elements: int32 below 2^31."""
    return torch.int64 if numel >= _INT32_LIMIT else torch.int32


def topk_compress(
    grad: torch.Tensor,
    residual: torch.Tensor | None,
    k: int,
    *,
    value_dtype: torch.dtype | None = None,
    values_out: torch.Tensor | None = None,
    indices_out: torch.Tensor | None = None,
    sq_norm_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selects the k largest-magnitude entries of ``grad + residual`` (flattened).

    Returns ``(values, indices)``: k values in ``value_dtype`` (float32 by default, float16 or
    bfloat16; taken from ``values_out`` when given) and their flat indices in ascending order,
    int32 (int64 when grad has 2^31 or more elements, or when ``indices_out`` is int64).
    ``residual`` (same dtype, device and element count as grad, contiguous) becomes ``acc`` with
    the selected entries zeroed; ``None`` means no error feedback. Raises ValueError for k outside
    1..numel or a mismatched size/device, TypeError for a wrong dtype or a non-contiguous tensor,
    before anything is written; ValueError when any two of grad, residual, values_out,
    indices_out (and sq_norm_out) share memory. ``sq_norm_out`` (one float64 element on grad's
    device) receives the sum of squares of ``grad`` (not of acc), accumulated in float64 in the
    same pass that reads grad. On CUDA the work is queued on the current stream and the host
    never waits."""
    grad = require_tensor("grad", grad)
    if residual is not None:
        residual = require_tensor("residual", residual)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    numel = grad.numel()
    if not 1 <= k <= numel:
        raise ValueError(f"k: expected 1 <= k <= grad.numel() = {numel}, got {k}")
    if values_out is None:
        dtype = torch.float32 if value_dtype is None else value_dtype
        if dtype not in _VALUE_DTYPES:
            raise TypeError(f"value_dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
        values_out = torch.empty(k, dtype=dtype, device=grad.device)
    else:
        values_out = require_tensor("values_out", values_out)
        if value_dtype is not None and values_out.dtype != value_dtype:
            raise TypeError(f"values_out: has dtype {values_out.dtype} but value_dtype is {value_dtype}")
    if indices_out is None:
        indices_out = torch.empty(k, dtype=index_dtype_for(numel), device=grad.device)
    else:
        indices_out = require_tensor("indices_out", indices_out)
    sq_bits = None
    if sq_norm_out is not None:
        sq_norm_out = require_tensor("sq_norm_out", sq_norm_out)
        if sq_norm_out.dtype != torch.float64 or sq_norm_out.numel() != 1:
            raise TypeError(
                f"sq_norm_out: expected one float64 element, got {sq_norm_out.numel()} of {sq_norm_out.dtype}"
            )
        # The native boundary has no float64: the kernel writes the double through its int64 bits.
        sq_bits = sq_norm_out.reshape(1).view(torch.int64)
    _C.topk_compress(grad, residual, k, values_out, indices_out, stream_of(grad), sq_bits)
    return values_out, indices_out


def topk_decompress(
    values: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    *,
    scale: float = 1.0,
    check_indices: bool = True,
) -> torch.Tensor:
    """Adds ``scale * values`` into the flattened ``out`` at ``indices`` (duplicates accumulate) and
    returns ``out``. Each update is computed in float32 and rounded into out's dtype. Every index
    must lie in ``[0, out.numel())``: otherwise ValueError and ``out`` is unchanged. On the CPU the
    result is deterministic (per element, updates apply in the order of ``values``). On CUDA the work
    runs on the current stream and the index check waits once for that stream (so it cannot be
    captured in a CUDA graph); duplicates are summed by float atomics in no fixed order.
    ``check_indices=False`` skips that check: an index outside ``out`` is then skipped (never
    written) instead of raising, and on CUDA the host never waits. For indices that come from
    ``topk_compress`` on a tensor of out's size, as in the DDP hook."""
    values = require_tensor("values", values)
    indices = require_tensor("indices", indices)
    out = require_tensor("out", out)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not isinstance(check_indices, bool):
        raise TypeError(f"check_indices: expected a bool, got {type(check_indices).__name__}")
    _C.topk_decompress(values, indices, out, float(scale), stream_of(out), check_indices)
    return out
