"""The gradient noise scale (McCandlish et al., 2018, "An Empirical Model of Large-Batch Training").

For gradients estimated from B samples, E|G_B|^2 = |G|^2 + tr(Sigma) / B, where G is the true
gradient and Sigma the per-sample gradient covariance. Two squared norms at two batch sizes b < B
(per-rank vs. all-reduced gradients in DDP; per-micro-batch vs. accumulated on one process) give
unbiased estimates of both terms:

    |G|^2     ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
    tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

Each estimate is noisy, so :class:`NoiseScale` keeps a separate bias-corrected exponential moving
average of each and reports their ratio, the simple noise scale B_simple = tr(Sigma) / |G|^2.

In DDP, after backward and before the gradients are averaged (or from the comm hook)::

    local = rt.ops.grad_stats(grads).total.sumsq          # |G_b|^2 of this rank's b samples
    # ... all-reduce local (mean over ranks) and compute the averaged gradients' sumsq ...
    noise.update(mean_local, b, global_sumsq, b * world_size)
    noise.b_simple, noise.gain(2.0), noise.updates
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from autoglm_rt.stateful import Stateful


@dataclass(frozen=True)
class NoiseEstimate:
    """One update's unbiased (noisy) estimates: ``grad_sqnorm`` ~ |G|^2, ``trace_cov`` ~ tr(Sigma)."""

    grad_sqnorm: float
    trace_cov: float


def estimate(local_sqnorm: float, local_batch: float, global_sqnorm: float, global_batch: float) -> NoiseEstimate:
    """Unbiased estimates of |G|^2 and tr(Sigma) from the mean squared norm of gradients over
    ``local_batch`` samples each and the squared norm of their average over ``global_batch``
    samples. Raises ValueError unless 0 < local_batch < global_batch and both norms are finite
    and >= 0."""
    _check_norm("local_sqnorm", local_sqnorm)
    _check_norm("global_sqnorm", global_sqnorm)
    b, big = float(local_batch), float(global_batch)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"local_batch: expected a positive number of samples, got {local_batch!r}")
    if not (math.isfinite(big) and big > b):
        raise ValueError(
            f"global_batch: expected more samples than local_batch ({local_batch!r}), got {global_batch!r}; "
            "the two squared norms must come from different batch sizes"
        )
    grad_sqnorm = (big * global_sqnorm - b * local_sqnorm) / (big - b)
    trace_cov = (local_sqnorm - global_sqnorm) / (1.0 / b - 1.0 / big)
    return NoiseEstimate(grad_sqnorm=grad_sqnorm, trace_cov=trace_cov)


def _check_norm(name: str, value: float) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number (a squared norm), got {type(value).__name__}") from None
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name}: expected a finite squared norm >= 0, got {value!r}")


class NoiseScale(Stateful):
    """Running gradient noise scale from (small-batch, big-batch) squared-norm pairs.

    ``beta``: the EMA's decay (0 <= beta < 1; 0 keeps only the latest update). Both averages are
    bias-corrected (divided by 1 - beta^n after n updates), so they are usable from the first
    update. ``base_batch`` (optional): the batch size :meth:`gain` scales from; by default the
    ``global_batch`` of the first update. Updates with a non-finite norm (an overflowed step)
    raise ValueError and change nothing.
    """

    _state_fields = ("_base_batch", "_updates", "_sqnorm_ema", "_trace_ema", "_weight")

    def __init__(self, beta: float = 0.99, base_batch: float | None = None) -> None:
        if not (0.0 <= float(beta) < 1.0):
            raise ValueError(f"beta: expected 0 <= beta < 1, got {beta!r}")
        if base_batch is not None and not float(base_batch) > 0:
            raise ValueError(f"base_batch: expected a positive batch size, got {base_batch!r}")
        self._beta = float(beta)
        self._base_batch = None if base_batch is None else float(base_batch)
        self.reset()

    def reset(self) -> None:
        """Forgets every update (e.g. after the learning rate or the model changed a lot)."""
        self._updates = 0
        self._sqnorm_ema = 0.0
        self._trace_ema = 0.0
        self._weight = 0.0  # 1 - beta^updates

    def update(self, local_sqnorm: float, local_batch: float, global_sqnorm: float, global_batch: float) -> None:
        """Adds one pair: ``local_sqnorm`` is the mean over ranks (or micro-batches) of the squared
        norm of a gradient over ``local_batch`` samples; ``global_sqnorm`` is the squared norm of
        their average, over ``global_batch`` samples."""
        est = estimate(local_sqnorm, local_batch, global_sqnorm, global_batch)
        if self._base_batch is None:
            self._base_batch = float(global_batch)
        b = self._beta
        self._sqnorm_ema = b * self._sqnorm_ema + (1.0 - b) * est.grad_sqnorm
        self._trace_ema = b * self._trace_ema + (1.0 - b) * est.trace_cov
        self._weight = b * self._weight + (1.0 - b)
        self._updates += 1

    @property
    def updates(self) -> int:
        """How many updates the estimate rests on."""
        return self._updates

    @property
    def grad_sqnorm(self) -> float | None:
        """Bias-corrected EMA of the |G|^2 estimates (None before the first update)."""
        return self._sqnorm_ema / self._weight if self._updates else None

    @property
    def trace_cov(self) -> float | None:
        """Bias-corrected EMA of the tr(Sigma) estimates (None before the first update)."""
        return self._trace_ema / self._weight if self._updates else None

    @property
    def b_simple(self) -> float | None:
        """tr(Sigma) / |G|^2 from the two averages; None until both are positive (before the first
        update, or while the noise still swamps the signal)."""
        g2, tr = self.grad_sqnorm, self.trace_cov
        if g2 is None or tr is None or g2 <= 0 or tr <= 0:
            return None
        return tr / g2

    @property
    def base_batch(self) -> float | None:
        """The batch size :meth:`gain` is relative to."""
        return self._base_batch

    def gain(self, scale: float) -> float | None:
        """AdaScale's gain ratio for a batch ``scale`` times :attr:`base_batch`:
        (tr(Sigma)/B0 + |G|^2) / (tr(Sigma)/(scale*B0) + |G|^2), between 1 and ``scale``: how many
        base-batch steps one step at the larger batch is worth. None until :attr:`b_simple` exists."""
        s = float(scale)
        if not (math.isfinite(s) and s >= 1.0):
            raise ValueError(f"scale: expected a finite batch scale >= 1, got {scale!r}")
        bs = self.b_simple
        if bs is None or self._base_batch is None:
            return None
        ratio = bs / self._base_batch  # tr(Sigma) / (B0 |G|^2)
        return (ratio + 1.0) / (ratio / s + 1.0)

    def __repr__(self) -> str:
        return f"NoiseScale(updates={self._updates}, b_simple={self.b_simple})"


__all__ = ["NoiseEstimate", "NoiseScale", "estimate"]
