"""The host tier's copies for CUDA parameters, on a side stream, overlapped with backward.

:class:`HostStaging` keeps pinned host buffers for every parameter and its gradient. A
post-accumulate-grad hook on each parameter enqueues the device-to-host copies of that parameter
and its fresh gradient on a side stream as soon as backward has produced it (ordered after the
main stream's work so far by ``wait_stream``), so the copies run while backward goes on with the
layers before it. :meth:`HostStaging.step` copies what the hooks did not see (gradients set by
hand, or changed after their copy: their version counter moved), waits for each copy's event, runs
the caller's host update (the fused CPU AdamW on the pinned buffers) and enqueues the host-to-device
copies of the parameters on the side stream after the main stream's pending work; the main stream
then waits for them, so the next forward reads the new parameters without the host blocking.

CUDA only. Written against torch's stream API; this project's CI has no GPU, so it is compiled
(imported, type-checked) here and its tests (``tests/test_offload_tiers.py``, marked ``cuda``) are
skipped: not run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class HostStaging:
    """Pinned host copies of ``params`` (CUDA tensors on one device) and of their gradients; see
    the module docstring. :meth:`close` removes the hooks."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        if not params:
            raise ValueError("params: expected at least one CUDA parameter")
        device = params[0].device
        for i, p in enumerate(params):
            if not p.is_cuda or p.device != device:
                raise ValueError(f"params[{i}]: expected a CUDA tensor on {device}, got one on {p.device}")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.host_params = {id(p): torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params}
        self.host_grads = {id(p): torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for p in params}
        # id(param) -> (the gradient tensor copied, its version then, the copy's event)
        self._copied: dict[int, tuple[torch.Tensor, int, torch.cuda.Event]] = {}
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is not None:
            self._copy_down(p)

    def _copy_down(self, p: torch.Tensor) -> None:
        """Enqueues the copies of ``p`` and its gradient to their pinned buffers."""
        grad = p.grad
        assert grad is not None
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the gradient (and the parameter) as the main stream left them
        event = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            self.host_params[id(p)].copy_(p.detach(), non_blocking=True)
            self.host_grads[id(p)].copy_(grad, non_blocking=True)
            event.record(self.stream)
        # The caching allocator must not hand the gradient's memory out again before the copy ran.
        grad.record_stream(self.stream)
        self._copied[id(p)] = (grad, grad._version, event)

    def step(self, params: Sequence[torch.Tensor], update: Callable[[list[Any], list[Any]], None]) -> None:
        """``update(host_params, host_grads)`` on the pinned copies of ``params`` (every one has a
        gradient), then the parameters go back to the device, ordered before the main stream's
        next work."""
        for p in params:
            seen = self._copied.get(id(p))
            if seen is None or seen[0] is not p.grad or seen[1] != p.grad._version:
                self._copy_down(p)
        for p in params:
            self._copied[id(p)][2].synchronize()
        host_params = [self.host_params[id(p)] for p in params]
        update(host_params, [self.host_grads[id(p)] for p in params])
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # nothing still queued may read a parameter being replaced
        done = torch.cuda.Event()
        with torch.cuda.stream(self.stream):
            for p, host in zip(params, host_params, strict=True):
                p.detach().copy_(host, non_blocking=True)
            done.record(self.stream)
        main.wait_event(done)
        for p in params:
            self._copied.pop(id(p), None)

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._copied.clear()


__all__ = ["HostStaging"]
