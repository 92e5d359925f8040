"""Batches as the Runtime sees them: a tensor, or a tuple/list/dict of tensors whose first
dimension is the sample; and the re-batching of a loader's batches to the effective batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

Batch = Any


def batch_size(batch: Batch) -> int:
    """Samples in ``batch``. Raises TypeError for anything that is not a batch, ValueError for a
    scalar tensor or parts that disagree on the sample count."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 0:
            raise ValueError("batch: expected a tensor with a sample dimension, got a scalar")
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        sizes = {batch_size(b) for b in batch}
    elif isinstance(batch, Mapping) and batch:
        sizes = {batch_size(b) for b in batch.values()}
    else:
        raise TypeError(
            f"batch: expected a tensor or a non-empty tuple/list/dict of tensors, got {type(batch).__name__}"
        )
    if len(sizes) != 1:
        raise ValueError(f"batch: its parts disagree on the number of samples: {sorted(sizes)}")
    return sizes.pop()


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Samples ``[start, stop)`` of ``batch`` (views, no copy), in the batch's own structure."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, tuple):
        return tuple(slice_batch(b, start, stop) for b in batch)
    if isinstance(batch, list):
        return [slice_batch(b, start, stop) for b in batch]
    return {k: slice_batch(v, start, stop) for k, v in batch.items()}


def concat_batches(batches: list[Batch]) -> Batch:
    """The samples of ``batches`` one after the other, in the first batch's structure."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches)
    if isinstance(first, (tuple, list)):
        parts = [concat_batches([b[i] for b in batches]) for i in range(len(first))]
        return tuple(parts) if isinstance(first, tuple) else parts
    return {k: concat_batches([b[k] for b in batches]) for k in first}


def rebatch(loader: Iterable[Batch], effective_batch: Callable[[int], int]) -> Iterator[Batch]:
    """Yields batches of exactly ``effective_batch(n)`` samples (asked again before each batch,
    so a policy may change it between steps; ``n`` is the size of the loader batch at hand), by
    splitting or joining the loader's batches; the last batch may be smaller. A loader batch of
    exactly the target size passes through untouched (no copy)."""
    pending: list[Batch] = []
    pending_n = 0
    for item in loader:
        n = batch_size(item)
        target = effective_batch(n)
        if not pending and n == target:
            yield item
            continue
        pending.append(item)
        pending_n += n
        while pending_n >= (target := effective_batch(n)):
            joined = pending[0] if len(pending) == 1 else concat_batches(pending)
            yield slice_batch(joined, 0, target)
            rest = pending_n - target
            pending = [slice_batch(joined, target, pending_n)] if rest else []
            pending_n = rest
    if pending_n:
        yield pending[0] if len(pending) == 1 else concat_batches(pending)


__all__ = ["Batch", "batch_size", "concat_batches", "rebatch", "slice_batch"]
