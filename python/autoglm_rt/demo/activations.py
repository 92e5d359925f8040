"""Activation memory, measured: the bytes of the tensors autograd saves for backward during a
forward pass (what a micro-batch holds until its backward frees it), parameters excluded.

Works on any device, including the CPU, where torch's allocator keeps no statistics: the tensors
are counted as autograd packs them (each storage once), so the figure is exact and the same on
every run of the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class ActivationMeter:
    """Wraps a loss function (:meth:`wrap`); :meth:`take_step_peak` returns the largest forward
    pass's saved bytes since the previous call (0 when no forward ran)."""

    def __init__(self, parameters: Iterable[torch.Tensor]) -> None:
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._peak = 0

    def wrap(self, loss_fn: LossFn) -> LossFn:
        def measured(model: torch.nn.Module, batch: Any) -> torch.Tensor:
            storages: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in self._parameter_storages:
                    storages[ptr] = storage.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
                loss = loss_fn(model, batch)
            self._peak = max(self._peak, sum(storages.values()))
            return loss

        return measured

    def take_step_peak(self) -> int:
        peak, self._peak = self._peak, 0
        return peak


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


__all__ = ["ActivationMeter"]
