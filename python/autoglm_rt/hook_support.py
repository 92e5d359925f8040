"""Small pieces the DDP communication hooks share (``autoglm_rt.ddp``, ``autoglm_rt.onebit``):
which device a group's collectives need, a one-read squared norm, an async all-gather, the
gradient sketch from which a hook that delivers an update estimates the averaged gradient's norm,
and the fill of AdamW's second moment where a dense start saw no gradient."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["SKETCH_SIZE", "all_gather", "fill_unmeasured", "group_device", "sketch_indices", "sq_norm"]

SKETCH_SIZE = 256  # gradient entries per bucket that an update-delivering hook sends for the norm estimate


def group_device(group: dist.ProcessGroup) -> torch.device:
    """The device a collective's tensors must live on for this group's backend."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm as a 0-dim float64 tensor, in one read of t (no temporaries, no sync)."""
    if t.dtype == torch.float32:
        return torch.dot(t, t).double()
    return torch.linalg.vector_norm(t, dtype=torch.float32).double().square()


def all_gather(output: torch.Tensor, message: torch.Tensor, group: dist.ProcessGroup) -> Any:
    """Starts an all-gather of every rank's ``message`` into ``output`` (rank order); returns the work."""
    # torch >= 2.13 names it all_gather_single (and deprecates all_gather_into_tensor).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, message, group=group, async_op=True)


def sketch_indices(numel: int, iteration: int, bucket_index: int, device: torch.device) -> torch.Tensor:
    """The entries of a bucket whose raw gradient every rank sends when the hook delivers an update
    rather than a gradient: ``SKETCH_SIZE`` uniform draws with replacement, seeded by (iteration,
    bucket) so that they are the same on every rank. ``numel / SKETCH_SIZE`` times the sum of
    squares of the averaged sketch is an unbiased estimate of the averaged gradient's squared norm
    (the noise-scale estimator's large-batch norm)."""
    gen = torch.Generator().manual_seed(1_000_003 * iteration + bucket_index)
    return torch.randint(numel, (SKETCH_SIZE,), generator=gen).to(device)


def fill_unmeasured(v: torch.Tensor, sizes: list[int]) -> None:
    """Where a dense start saw no gradient (an embedding row of a token not yet seen), eps alone
    would make the first gradient a step of g / eps: those entries of AdamW's second moment ``v``
    (a bucket holding parameters of ``sizes`` elements) take the mean of the measured entries of
    their parameter (of the bucket if none). Derived from the averaged gradients only, so ``v``
    stays identical on every rank; and proportional to the gradient, not sign-like (equal
    magnitudes would tie in a top-k selection)."""
    measured = v > 0
    if bool(measured.all()) or not bool(measured.any()):
        return
    fallback = v[measured].mean()
    if sum(sizes) != v.numel():
        sizes = [v.numel()]
    for piece, seen in zip(torch.split(v, sizes), torch.split(measured, sizes), strict=True):
        piece.masked_fill_(~seen, piece[seen].mean() if bool(seen.any()) else fallback)
