"""The demo's baseline run: dense allreduce (torch's ``allreduce_hook``, bytes counted), a static
batch, no policy. Its activation memory is measured the same way as the autoglm_rt run's."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from autoglm_rt.demo.activations import ActivationMeter
from autoglm_rt.demo.model import loss_fn


@dataclass
class ByteCounters:
    bytes_communicated: int = 0
    dense_bytes: int = 0


def counting_allreduce_hook(state, bucket):  # type: ignore[no-untyped-def]
    """torch's allreduce_hook, counting the bytes it hands to the collective. (Unannotated: DDP
    checks the hook's annotations against real classes, and this module's are strings.)"""
    buf = bucket.buffer()
    state.bytes_communicated += buf.numel() * buf.element_size()
    state.dense_bytes += buf.numel() * buf.element_size()
    return default_hooks.allreduce_hook(None, bucket)


class BaselineRun:
    pool = None

    def __init__(self, model: DDP, optimizer: torch.optim.Optimizer, batch: int) -> None:
        self.model, self.optimizer, self.batch = model, optimizer, batch
        self.counters = ByteCounters()
        model.register_comm_hook(self.counters, counting_allreduce_hook)
        self.activations = ActivationMeter(model.parameters())
        self.loss_fn = self.activations.wrap(loss_fn)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, dict[str, Any]]:
        loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), {
            "micro_batch": self.batch,
            "accumulation": 1,
            "phase": None,
            "activation_bytes": self.activations.take_step_peak(),
            "bytes_communicated_total": self.counters.bytes_communicated,
        }

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.counters)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # In place: the registered hook holds this very object.
        self.counters.bytes_communicated = int(state["bytes_communicated"])
        self.counters.dense_bytes = int(state["dense_bytes"])

    def summary(self) -> dict[str, Any]:
        return {"bytes_communicated": self.counters.bytes_communicated, "dense_bytes": self.counters.dense_bytes}

    def close(self) -> None:
        """Nothing to release: the baseline holds no threads or servers."""
