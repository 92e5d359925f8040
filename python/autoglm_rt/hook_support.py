"""Small pieces the DDP communication hooks share (``autoglm_rt.ddp``, ``autoglm_rt.onebit``):
which device a group's collectives need, a one-read squared norm, an async all-gather, the
gradient sketch from which a hook that delivers an update estimates the averaged gradient's norm,
the fill of AdamW's second moment where a dense start saw no gradient, the check of Adam's
hyperparameters, and the per-iteration record of squared norms behind a hook's ``norms()``."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "NORM_NAMES",
    "SKETCH_SIZE",
    "IterationNorms",
    "all_gather",
    "check_adam_hyperparameters",
    "fill_unmeasured",
    "group_device",
    "sketch_indices",
    "sq_norm",
]

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


def check_adam_hyperparameters(beta1: object, beta2: object, eps: object) -> None:
    """ValueError naming the first of ``beta1``, ``beta2`` (numbers in [0, 1)) and ``eps`` (a
    finite number > 0) that is not one; bools are not numbers here."""
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
            raise ValueError(f"{name}: expected a number in [0, 1), got {b!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")


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


NORM_NAMES = ("local_sq_norm", "mean_local_sq_norm", "global_sq_norm")


class IterationNorms:
    """The squared gradient norms a hook records per bucket (``NORM_NAMES``: this rank's, the mean
    over ranks of each rank's own, the averaged gradient's), for the iteration in progress and the
    last finished one (older iterations are dropped). Tensors may be appended by a collective's
    callback after the hook returned; they are read (a host wait on a GPU) only when asked for."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[str, list[torch.Tensor]]] = {}

    def lists(self, iteration: int) -> dict[str, list[torch.Tensor]]:
        """The lists to append ``iteration``'s per-bucket norms to (1-element float64 tensors)."""
        if iteration not in self._parts:
            self._parts[iteration] = {name: [] for name in NORM_NAMES}
            self._parts.pop(iteration - 2, None)
        return self._parts[iteration]

    def total(self, iteration: int, name: str) -> float | None:
        """One norm of ``iteration`` summed over its buckets; None when it has none recorded."""
        parts = self._parts.get(iteration)
        return None if parts is None else float(sum(float(t.item()) for t in parts[name]))

    def summary(self, iteration: int, world_size: int) -> dict[str, float] | None:
        """Every norm of ``iteration`` summed over its buckets, plus ``world_size``; None when the
        iteration has none recorded."""
        if iteration not in self._parts:
            return None
        out = {name: self.total(iteration, name) or 0.0 for name in NORM_NAMES}
        out["world_size"] = float(world_size)
        return out

    def state(self, iteration: int) -> dict[str, list[float]] | None:
        """``iteration``'s per-bucket norms as plain floats (for a state dict), or None."""
        parts = self._parts.get(iteration)
        return None if parts is None else {k: [float(t.item()) for t in v] for k, v in parts.items()}

    def load(self, iteration: int, saved: dict[str, list[float]] | None) -> None:
        """Forgets everything, then restores :meth:`state`'s output as ``iteration``'s norms."""
        self._parts = {}
        if saved is not None:
            self._parts[iteration] = {k: [torch.tensor([x], dtype=torch.float64) for x in v] for k, v in saved.items()}
