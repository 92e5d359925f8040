"""Measured costs of one training step, the inputs of ``demo.projection``: the time a DDP comm hook
spends synchronously (the compression), the compute of a step without communication, and the
hooks' callback costs (top-k: zeroing each bucket, the scatter-add and norm gather of one rank's
message; 1-bit: decoding one rank's message), all timed on the caller's own model and bucket sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from statistics import median
from typing import Any

import torch
from torch import nn

from autoglm_rt.ops import topk_decompress
from autoglm_rt.ops.onebit import onebit_adam_decompress, sign_message_sizes
from autoglm_rt.ops.topk import index_dtype_for

Hook = Callable[[Any, Any], "torch.futures.Future[torch.Tensor]"]


class HookTimer:
    """Wraps a DDP comm hook; adds up the time spent inside it (its synchronous part: compression
    and the collectives' launch, not their wait) and remembers each bucket's size by index."""

    def __init__(self, hook: Hook) -> None:
        self.seconds = 0.0
        self.bucket_numels: dict[int, int] = {}
        timer = self

        def timed(state, bucket):  # type: ignore[no-untyped-def]
            # Unannotated: DDP checks a hook's annotations against real classes.
            t = time.perf_counter()
            try:
                return hook(state, bucket)
            finally:
                timer.seconds += time.perf_counter() - t
                timer.bucket_numels[bucket.index()] = bucket.buffer().numel()

        self.hook = timed

    def take(self) -> float:
        """Seconds spent in the hook since the last call."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def compute_seconds(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    micro_batches: Sequence[Any],
    repeats: int = 5,
) -> float:
    """Median wall time of forward and backward over ``micro_batches`` (one optimizer step's worth)
    without communication: under DDP's ``no_sync`` no hook runs. The gradients are discarded
    (set to None); weights and optimizer are untouched."""
    if repeats < 1 or not micro_batches:
        raise ValueError(f"repeats, micro_batches: expected >= 1 each, got {repeats}, {len(micro_batches)}")
    no_sync = getattr(model, "no_sync", None)
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        with no_sync() if no_sync is not None else torch.enable_grad():
            for mb in micro_batches:
                loss_fn(model, mb).backward()
        times.append(time.perf_counter() - t)
    model.zero_grad(set_to_none=True)
    return median(times)


def callback_seconds(bucket_numels: Sequence[int], density: float, repeats: int = 5) -> tuple[float, float]:
    """``(fixed_s, per_rank_s)`` of the top-k hook's callbacks over buckets of ``bucket_numels``
    float32 elements at ``density``: zeroing every bucket once per step, and the scatter-add plus
    the norm gather (a dot at the sent indices) of one rank's message. Medians of ``repeats``."""
    if not bucket_numels or not 0 < density <= 1:
        raise ValueError(f"bucket_numels, density: expected buckets and 0 < density <= 1, got {density}")
    gen = torch.Generator().manual_seed(0)
    buckets = []
    for numel in bucket_numels:
        k = max(1, min(numel, round(density * numel)))
        indices = torch.randperm(numel, generator=gen)[:k].to(index_dtype_for(numel))
        buckets.append((torch.zeros(numel), torch.randn(k, generator=gen), indices))
    fixed, per_rank = [], []
    for _ in range(repeats + 1):  # the first pass warms the buffers up (page faults) and is dropped
        zero_s = scatter_s = 0.0
        for buffer, values, indices in buckets:
            t = time.perf_counter()
            buffer.zero_()
            t1 = time.perf_counter()
            topk_decompress(values, indices, buffer, scale=0.5, check_indices=False)
            torch.dot(values.double(), buffer[indices.long()].double())
            t2 = time.perf_counter()
            zero_s += t1 - t
            scatter_s += t2 - t1
        fixed.append(zero_s)
        per_rank.append(scatter_s)
    fixed, per_rank = fixed[1:], per_rank[1:]
    return median(fixed), median(per_rank)


def sign_callback_seconds(bucket_numels: Sequence[int], chunk: int, repeats: int = 5) -> tuple[float, float]:
    """``(fixed_s, per_rank_s)`` of the 1-bit hook's callback over buckets of ``bucket_numels``
    float32 elements (``onebit_adam_decompress``: decode the ranks' signs and scales, write ``u``
    and the bias-corrected step in one pass), fitted to passes over 2 and 8 ranks' rows:
    ``per_rank_s`` is what each further row adds, ``fixed_s`` the rest (both at least 0).
    Medians of ``repeats``."""
    if not bucket_numels or chunk < 1:
        raise ValueError(f"bucket_numels, chunk: expected buckets and chunk >= 1, got {chunk}")
    few, many = 2, 8
    gen = torch.Generator().manual_seed(0)
    buckets = []
    for numel in bucket_numels:
        nbytes, nchunks = sign_message_sizes(numel, chunk)
        bits = torch.randint(0, 256, (many, nbytes), dtype=torch.uint8, generator=gen)
        buckets.append((torch.zeros(numel), torch.zeros(numel), bits, torch.rand(many, nchunks, generator=gen)))
    few_s, many_s = [], []
    for _ in range(repeats + 1):  # the first pass warms the buffers up (page faults) and is dropped
        a = b = 0.0
        for buffer, u, bits, scales in buckets:
            t = time.perf_counter()
            onebit_adam_decompress(bits[:few], scales[:few], buffer, u, chunk, scale=1 / few, bias=1.1)
            t1 = time.perf_counter()
            onebit_adam_decompress(bits, scales, buffer, u, chunk, scale=1 / many, bias=1.1)
            t2 = time.perf_counter()
            a += t1 - t
            b += t2 - t1
        few_s.append(a)
        many_s.append(b)
    at_few, at_many = median(few_s[1:]), median(many_s[1:])
    per_rank = max((at_many - at_few) / (many - few), 0.0)
    return max(at_few - few * per_rank, 0.0), per_rank


__all__ = ["HookTimer", "callback_seconds", "compute_seconds", "sign_callback_seconds"]
