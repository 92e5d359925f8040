"""Gradient accumulation over micro-batches that survives running out of memory.

``loss_fn(model, micro_batch)`` returns the *mean* loss over the micro-batch; each micro-batch is
weighted by its share of the batch, so the accumulated gradient is the gradient of the batch's
mean loss whatever the split.

- A plain model: each micro-batch's gradient is computed with ``torch.autograd.grad`` and added to
  ``.grad`` only once the whole micro-batch succeeded, so one that runs out of memory halfway
  leaves no trace; it is redone at half the size and no sample is lost or counted twice.
- A ``DistributedDataParallel`` model (whose reducer needs ``backward()``): the step is restarted
  from the gradients it started with, at the smaller size; every sample is still counted once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from autoglm_rt.ops import add_sumsq_, grad_stats
from autoglm_rt.policy.batch import BatchController
from autoglm_rt.policy.oom import is_out_of_memory, run_step
from autoglm_rt.runtime.batching import Batch, slice_batch

LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


class Accumulator:
    """Runs one batch's forward/backward passes into the parameters' ``.grad``.

    ``autocast``: returns the context each forward pass runs in. ``limit_bytes``: the memory limit
    now (None: none), told to the controller on an OOM. ``micro_sqnorms`` collects, per step,
    ``(squared norm of the micro-batch's mean-loss gradient, samples)`` when a batch is split
    (the noise-scale estimator's input on one process); :meth:`take_sqnorms` hands them over."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        autocast: Callable[[], contextlib.AbstractContextManager[Any]],
        limit_bytes: Callable[[], float | None],
    ) -> None:
        self.model = model
        self.params = params
        self.autocast = autocast
        self.limit_bytes = limit_bytes
        self.is_ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.micro_sqnorms: list[tuple[float, int]] = []
        # float32 CPU gradients are added and measured in one native pass (add_sumsq_); others
        # (CUDA, reduced-precision parameters) by torch's foreach add and grad_stats.
        self.fused_norms = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)

    def run(self, batch: Batch, n: int, loss_fn: LossFn, controller: BatchController) -> torch.Tensor:
        """Accumulates the gradient of ``batch``'s mean loss (``n`` samples) onto ``.grad``;
        returns the batch's mean loss as a detached float32 scalar."""
        if self.is_ddp:
            return self._run_ddp(batch, n, loss_fn, controller)
        return self._run_exact(batch, n, loss_fn, controller)

    def take_sqnorms(self) -> list[tuple[float, int]]:
        out, self.micro_sqnorms = self.micro_sqnorms, []
        return out

    def _run_exact(self, batch: Batch, n: int, loss_fn: LossFn, controller: BatchController) -> torch.Tensor:
        params = self.params
        total = torch.zeros((), dtype=torch.float64, device=params[0].device)
        want_norms = n > controller.micro_batch or bool(self.micro_sqnorms)
        sqnorms: list[tuple[float, int]] = []

        def process(start: int, stop: int) -> None:
            weight = (stop - start) / n
            whole = start == 0 and stop == n
            with self.autocast():
                loss = loss_fn(self.model, batch if whole else slice_batch(batch, start, stop))
            check_loss(loss)
            # The micro-batch's share of the batch's mean-loss gradient, weighted through the
            # loss (as ``(loss * weight).backward()`` would be), so no pass over the gradients
            # scales them afterwards.
            scaled = loss.float() if whole else loss.float() * weight
            grads = torch.autograd.grad(scaled, params, allow_unused=True)
            # Only now, after the whole micro-batch succeeded, does it touch .grad.
            fresh: list[torch.Tensor] = []
            acc: list[torch.Tensor] = []
            add: list[torch.Tensor] = []
            for p, g in zip(params, grads, strict=True):
                if g is None:
                    continue
                if not g.is_contiguous():
                    g = g.contiguous()  # e.g. the expanded gradient of p.sum(): own memory
                if p.grad is None:
                    p.grad = g
                    fresh.append(g)
                else:
                    acc.append(p.grad)
                    add.append(g)
            if want_norms:
                # The squared norm of the micro-batch's own mean-loss gradient (the weighted
                # gradients' sum of squares, unweighted by the scalar), read in the same pass
                # that adds them where the native kernel applies.
                if self.fused_norms:
                    sq = add_sumsq_(acc, add) if acc else 0.0
                    sq += add_sumsq_([], fresh) if fresh else 0.0
                else:
                    sq = float(grad_stats(fresh + add).total.sumsq) if fresh or add else 0.0
                    if acc:
                        torch._foreach_add_(acc, add)
                sqnorms.append((sq / (weight * weight), stop - start))
            elif acc:
                torch._foreach_add_(acc, add)  # one fused call for all parameters
            total.add_(loss.detach(), alpha=weight)

        run_step(n, process, controller, limit_bytes=self.limit_bytes)
        self.micro_sqnorms.extend(sqnorms)
        return total.float()

    def _run_ddp(self, batch: Batch, n: int, loss_fn: LossFn, controller: BatchController) -> torch.Tensor:
        saved = [None if p.grad is None else p.grad.clone() for p in self.params]
        device = self.params[0].device
        while True:
            total = torch.zeros((), dtype=torch.float64, device=device)
            chunks = controller.chunks(n)
            try:
                for i, (start, stop) in enumerate(chunks):
                    weight = (stop - start) / n
                    last = i == len(chunks) - 1
                    sync = contextlib.nullcontext() if last else self.model.no_sync()  # type: ignore[operator]
                    with sync:
                        with self.autocast():
                            loss = loss_fn(self.model, slice_batch(batch, start, stop))
                        check_loss(loss)
                        (loss.float() * weight).backward()
                    total = total + loss.detach().double() * weight
                return total.float()
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                controller.on_oom(exc, limit_bytes=self.limit_bytes())
                for p, s in zip(self.params, saved, strict=True):
                    p.grad = None if s is None else s.clone()


def check_loss(loss: Any) -> None:
    """Raises TypeError unless ``loss`` is a one-element tensor."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise TypeError(
            f"loss_fn: expected a scalar tensor (the mean loss of the micro-batch), got {type(loss).__name__}{shape}"
        )


__all__ = ["Accumulator", "LossFn", "check_loss"]
